"""The megatron-core CPU compatibility shim: the one place that makes megatron-core run without CUDA.

megatron-core 0.16.1 assumes a CUDA device in a handful of places (PLATFORM.md lists the ones we
hit). Everything that gets past them lives here, is installed by :func:`install` exactly once per
process, and only when the training device is the CPU. Nothing else in the project names "cuda".

Patches, each with the upstream assumption it answers:

1. ``_CudaToCpu`` (a ``torch.overrides.TorchFunctionMode``), entered for the rest of the process:
   - hard-coded ``device="cuda"`` / ``device=torch.cuda.current_device()`` in tensor factories
     (pipeline p2p shape exchange, optimizer scale tensors, grad-norm buffers, DDP buffers,
     RoPE frequencies) -> the device argument is rewritten to ``cpu``;
   - ``tensor.cuda()`` / ``tensor.to("cuda")`` (optimizer state loading) -> stays on cpu;
   - ``tensor.type() == "torch.cuda.FloatTensor"`` checks (grad clipping in
     ``optimizer/clip_grads.py``, fp32 param detection in ``optimizer/optimizer.py`` and
     ``optimizer/distrib_optimizer.py``) -> ``Tensor.type()`` without arguments reports the CUDA
     spelling of the same dtype.
2. ``torch.cuda.current_device() -> 0`` (p2p communication, distributed optimizer buffers): the
   returned 0 then reaches a factory as ``device=0`` and patch 1 maps it to cpu.
3. ``torch.cuda.synchronize() -> no-op`` (p2p communication after batched isend/irecv, DDP).
4. The CUDA RNG tracker: ``model_parallel_cuda_manual_seed`` asserts a CUDA generator. We install
   megatron's inference (no-op) tracker instead; that is exact because the project trains with
   dropout 0 and initializes weights on the CPU RNG (``use_cpu_initialization=True``).

5. Activation recompute saves/restores the CUDA RNG state with ``torch.cuda.random`` (in
   ``tensor_parallel/random.py``): those two helpers become no-ops on CPU.

Not patched here but avoided by the callers: the causal mask megatron builds with
``device="cuda"`` when ``attention_mask is None`` (the engine passes an explicit mask on CPU), and
the fused kernels (masked softmax, bias-activation, RoPE, grad-accumulation fusion), which the
model builder turns off on CPU.
"""
from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_LOCK = threading.Lock()

# Factory functions and methods whose ``device`` argument may name cuda inside megatron-core.
_CPU = torch.device("cpu")


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):  # torch treats a bare int device as cuda:<int>
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


def _cuda_type_name(t: torch.Tensor) -> str:
    """'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (what megatron compares against)."""
    name = torch.Tensor.type(t)
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device requests to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # Patch 1a: device= keyword in factories, .to(), .new_*.
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        # Patch 1b: tensor.cuda(...) -> tensor (already on the cpu).
        if func is torch.Tensor.cuda:
            return args[0]
        # Patch 1b: tensor.to("cuda") / tensor.to(0) / tensor.to(torch.device("cuda")).
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        # Patch 1c: Tensor.type() string checks.
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        return func(*args, **kwargs)


def _current_device() -> int:
    return 0


def _synchronize(device=None) -> None:
    return None


def install() -> None:
    """Install all patches (idempotent). Call only on a machine where training runs on the CPU."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError("megatron_tppo.platform.cpu is the CPU shim; a GPU is visible")
        # Patch 2 and 3.
        torch.cuda.current_device = _current_device
        torch.cuda.synchronize = _synchronize
        # Patch 1: the mode stays entered for the life of the process (megatron creates cuda
        # tensors lazily, e.g. at the first optimizer step or checkpoint load).
        _CudaToCpu().__enter__()
        # Patch 4: a no-op RNG tracker (dropout is 0; init uses the CPU RNG).
        from megatron.core.tensor_parallel import random as mp_random

        mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        # Patch 5: activation recompute (CheckpointFunction) saves and restores the CUDA RNG
        # state around each recomputed layer via torch.cuda.random; there is no CUDA generator, so
        # an empty state stands in (nothing draws from it: dropout is 0).
        mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
        mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
        _INSTALLED = True


def installed() -> bool:
    """True once :func:`install` ran in this process."""
    return _INSTALLED

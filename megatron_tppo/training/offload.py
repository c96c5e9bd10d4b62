"""Move a training engine's tensors off its device and back, for colocated rollout.

While the rollout engines generate on the same GPUs, the trainer must hold (almost) no device
memory. :class:`StorageOffloader` frees tensor *storages* in place: every tensor that views a
storage (``param.data``, ``param.main_grad``, megatron DDP's bucket views, the distributed
optimizer's shards) stays the same Python object, only the memory behind it goes away
(``untyped_storage().resize_(0)``) and comes back (``resize_(nbytes)`` + copy) on onload. So
nothing in megatron-core has to be rebuilt or re-pointed.

What moves, by kind (:func:`engine_tensors`), deduplicated by storage:

- ``params``: megatron DDP's contiguous parameter buffers (``param_data``; with the distributed
  optimizer every parameter is a view into them) and every parameter's own storage (models
  without DDP, e.g. a forward-only engine).
- ``grads``: DDP's contiguous gradient buffers (the fp32 ``main_grad`` of every parameter) and any
  ``param.grad``.
- ``optimizer``: the distributed optimizer's fp32 master shards of bf16/fp16 parameters and every
  tensor in the inner torch optimizer's state (Adam ``exp_avg``, ``exp_avg_sq``, ``step``).

Besides, every offload drops megatron's scratch buffers (:func:`release_scratch_buffers`): they
carry no state, so they are not copied, and megatron reallocates them when it next needs them.

A storage goes with the first kind that reaches it in that order: for an fp32 model the "master
shards" are views into the parameter buffer, so they move with ``params``. Before the first
optimizer step Adam has no state yet; there is simply nothing of that kind to move.

The bytes are kept in host buffers (pinned on CUDA, reused by the next offload, so the pinned
allocation is paid once). The same code runs on CPU, where the "device" is host memory: storages
are freed and restored the same way (that is what the CPU tests exercise), only no memory is saved.
Reading an offloaded tensor is undefined (a segfault on CPU): the engine refuses to run while
anything is offloaded.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Iterable

import torch

KINDS = ("params", "grads", "optimizer")


def _inner_optimizers(optimizer) -> list:
    """megatron's optimizers behind ``optimizer`` (a ChainedOptimizer or a single one)."""
    if optimizer is None:
        return []
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def engine_tensors(engine) -> dict[str, list[torch.Tensor]]:
    """The tensors behind each kind (see module doc); views of one storage may repeat."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    # megatron DDP keeps its buffer list in ``buffers`` (shadowing nn.Module.buffers())
    ddp = getattr(engine.model, "buffers", None)
    ddp_buffers = list(ddp) if isinstance(ddp, list) else []
    ddp_buffers += list(getattr(engine.model, "expert_parallel_buffers", None) or [])
    for buf in ddp_buffers:
        if buf.param_data is not None:
            out["params"].append(buf.param_data)
        if buf.grad_data is not None:
            out["grads"].append(buf.grad_data)
    for p in engine.module.parameters():
        out["params"].append(p.data)
        if getattr(p, "main_grad", None) is not None:
            out["grads"].append(p.main_grad)
        if p.grad is not None:
            out["grads"].append(p.grad)
    for opt in _inner_optimizers(engine.optimizer):
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            out["optimizer"].extend(t for t in group if t is not None)
        for state in opt.optimizer.state.values():
            out["optimizer"].extend(v for v in state.values() if torch.is_tensor(v))
    return out


@dataclass
class _Slot:
    """One freed storage and the host buffer that holds its bytes."""

    storage: torch.UntypedStorage
    nbytes: int
    kind: str
    host: torch.Tensor  # uint8 [nbytes]


def _bytes_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the whole storage (for copying its bytes)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))


class StorageOffloader:
    """Frees and restores the storages of tensors on one device (``"cpu"`` or ``"cuda"``).

    It holds references to the storages only while they are offloaded; host buffers are pooled by
    size between offloads (the next offload of the same tensors reuses them).
    """

    def __init__(self, device: str):
        self.device = device
        self._out: list[_Slot] = []
        self._pool: dict[int, list[torch.Tensor]] = {}

    @property
    def offloaded_kinds(self) -> set[str]:
        return {s.kind for s in self._out}

    @property
    def host_buffers(self) -> list[torch.Tensor]:
        """Every host buffer (in use or pooled), for memory accounting."""
        return [s.host for s in self._out] + [h for hs in self._pool.values() for h in hs]

    def _live_storages(self, tensors: dict[str, list[torch.Tensor]]) -> dict[int, tuple]:
        """data_ptr -> (storage, nbytes, kind) of the live storages; the first kind claims each."""
        found: dict[int, tuple] = {}
        dev = torch.device(self.device).type
        for kind in KINDS:
            for t in tensors.get(kind, []):
                st = t.untyped_storage()
                n = st.nbytes()
                # empty: offloaded already; another device: e.g. Adam's CPU step counter on a GPU run
                if n and st.device.type == dev:
                    found.setdefault(st.data_ptr(), (st, n, kind))
        return found

    def _host(self, nbytes: int) -> torch.Tensor:
        spare = self._pool.get(nbytes)
        if spare:
            return spare.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device == "cuda")

    def offload(self, tensors: dict[str, list[torch.Tensor]], kinds: Iterable[str]) -> dict:
        """Copy the storages of ``kinds`` to host and free them. Returns bytes/storages/seconds."""
        kinds = set(kinds)
        t0 = time.perf_counter()
        cuda = self.device == "cuda"
        todo = [_Slot(st, n, kind, self._host(n))
                for st, n, kind in self._live_storages(tensors).values() if kind in kinds]
        for s in todo:
            s.host.copy_(_bytes_view(s.storage, s.nbytes), non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()  # every copy must land before its source is freed
        for s in todo:
            s.storage.resize_(0)
        self._out.extend(todo)  # (the caller empties the CUDA cache, so that vLLM can take the memory)
        moved = {k: sum(s.nbytes for s in todo if s.kind == k) for k in KINDS}
        return {"bytes": sum(moved.values()), "storages": len(todo), "seconds": time.perf_counter() - t0,
                **{f"{k}_bytes": v for k, v in moved.items()}}

    def onload(self) -> dict:
        """Reallocate every offloaded storage and copy its bytes back (bit-identical)."""
        t0 = time.perf_counter()
        cuda = self.device == "cuda"
        for s in self._out:
            s.storage.resize_(s.nbytes)
            _bytes_view(s.storage, s.nbytes).copy_(s.host, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        done, self._out = self._out, []
        for s in done:
            self._pool.setdefault(s.nbytes, []).append(s.host)
        return {"bytes": sum(s.nbytes for s in done), "storages": len(done), "seconds": time.perf_counter() - t0}


def release_scratch_buffers() -> int:
    """Drop megatron's process-wide scratch tensors (parallel_state's GlobalMemoryBuffer: the
    local attention's [b*heads, s, s] score buffer, TP all-gather workspaces). They hold no state
    (megatron allocates them again, uninitialized, on the next use), and at long sequence lengths
    they are large. Returns the bytes released."""
    from megatron.core import parallel_state as ps

    try:
        buf = ps.get_global_memory_buffer()
    except AssertionError:  # parallel state not initialized: nothing allocated
        return 0
    n = sum(t.untyped_storage().nbytes() for t in buf.buffer.values())
    buf.buffer.clear()
    return n


# ---------------------------------------------------------------------- checks (tests, benchmark)

def engine_snapshot(engine) -> dict[str, torch.Tensor]:
    """Host copies of everything offload must preserve: parameters, main grads, master shards and
    the optimizer state, by name. Read through the model and optimizer APIs, not the offloader."""
    snap: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        snap[f"param/{name}"] = p.detach().cpu().clone()
        if getattr(p, "main_grad", None) is not None:
            snap[f"main_grad/{name}"] = p.main_grad.detach().cpu().clone()
    for i, opt in enumerate(_inner_optimizers(engine.optimizer)):
        for g, group in enumerate(getattr(opt, "shard_fp32_from_float16_groups", [])):
            for j, t in enumerate(group):
                if t is not None:
                    snap[f"master/{i}/{g}/{j}"] = t.detach().cpu().clone()
        for idx, state in opt.optimizer.state_dict()["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    snap[f"optim/{i}/{idx}/{k}"] = v.detach().cpu().clone()
    return snap


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.view(-1).to(torch.uint8)


def snapshot_mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names that differ between two snapshots: missing on one side, or not bit-identical."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
            bad.append(k)
    return bad


def live_tensor_bytes(device: str, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages on ``device`` behind every tensor the garbage collector sees,
    ``exclude``'s storages left out: an allocator-independent count (torch.cuda.memory_allocated's
    role on CPU)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    dev = torch.device(device).type
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type != dev:
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - odd tensor subclasses without storage
            continue
        n = st.nbytes()
        if n and st.data_ptr() not in skip:
            seen[st.data_ptr()] = n
    return sum(seen.values())

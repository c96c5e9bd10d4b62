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

Host memory: one buffer per offloader (per rank), each copied storage a slice of it starting at a
multiple of :data:`ALIGN` bytes, so the buffer is ``sum(round_up(nbytes, ALIGN))`` over the
storages it holds: exact up to less than ``ALIGN`` bytes per storage. On CUDA it is a plain host
allocation page-locked with ``cudaHostRegister``, not ``pin_memory=True``: PyTorch's pinned
(caching host) allocator rounds every request up to a power of two, which costs up to 2x. Layout
policy: the first offload after a full onload (a *cycle*) lays out a slice for every storage of
every kind, except the kinds that call drops, so later offloads in the cycle (e.g. the policy's
parameters after its optimizer state) fill slices already there. The buffer is reused while the
layout fits in it; when it does not (Adam's state appears after the first step) it is replaced,
empty at that point, by one of exactly the new size. It never shrinks.

Dropping (``drop`` kinds, the engine's ``offload(grads="drop")``): the storages are freed without
a copy and onload re-creates them zero-filled. That is lossless only when their content would be
zeroed before anyone reads it, which the caller knows (the engine's ``train_step`` zeroes the
gradient buffers before its backward).

The same code runs on CPU, where the "device" is host memory: storages are freed and restored the
same way, the buffer is an ordinary tensor (that is what the CPU tests exercise), only no memory
is saved. Reading an offloaded tensor is undefined (a segfault on CPU): the engine refuses to run
while anything is offloaded.
"""
from __future__ import annotations

import gc
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

KINDS = ("params", "grads", "optimizer")
ALIGN = 64
"""Bytes: every slice of the host buffer starts at a multiple of this (torch's CPU allocator
aligns the buffer itself to 64), so a slice is aligned for any dtype and for DMA."""


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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
    """One freed storage; ``offset`` into the host buffer, None when dropped (no copy)."""

    storage: torch.UntypedStorage
    nbytes: int
    kind: str
    offset: Optional[int]


def _bytes_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the whole storage (for copying its bytes)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))


def _unregister(buf: torch.Tensor) -> None:
    """Unpin ``buf`` (then the last reference to it goes). Errors are ignored: at interpreter exit
    the CUDA context may be gone already, and the memory is freed either way."""
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:  # noqa: BLE001
        pass


def allocate_host(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of exactly ``nbytes``; with ``pin``, page-locked in place by
    ``cudaHostRegister`` (portable). The caller unregisters it (:func:`_unregister`) before the
    last reference goes."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 1))  # 1: cudaHostRegisterPortable
        if err:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with cudaError {err}")
    return buf


class StorageOffloader:
    """Frees and restores the storages of tensors on one device (``"cpu"`` or ``"cuda"``), with
    the bytes in one host buffer laid out per cycle (see the module doc). It holds references to
    the storages only while they are offloaded."""

    def __init__(self, device: str):
        self.device = device
        self._out: list[_Slot] = []
        self._host: Optional[torch.Tensor] = None
        self._unpin: Optional[weakref.finalize] = None
        self._layout: dict[int, int] = {}  # data_ptr -> offset, for the current cycle

    @property
    def offloaded_kinds(self) -> set[str]:
        """Kinds with a storage off the device, copied or dropped."""
        return {s.kind for s in self._out}

    @property
    def dropped_kinds(self) -> set[str]:
        return {s.kind for s in self._out if s.offset is None}

    @property
    def host_bytes(self) -> int:
        """Size of the host buffer (pinned on CUDA), 0 before the first offload."""
        return 0 if self._host is None else self._host.numel()

    @property
    def storage_bytes(self) -> int:
        """Bytes of the offloaded storages whose copies the host buffer holds now."""
        return sum(s.nbytes for s in self._out if s.offset is not None)

    @property
    def pinned(self) -> bool:
        return self._unpin is not None and self._unpin.alive

    @property
    def host_buffers(self) -> list[torch.Tensor]:
        """The host buffer (at most one), for memory accounting."""
        return [] if self._host is None else [self._host]

    def _live_storages(self, tensors: dict[str, list[torch.Tensor]]) -> dict[int, tuple]:
        """data_ptr -> (storage, nbytes, kind) of the live storages, in KINDS order; the first
        kind claims each."""
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

    def _plan(self, live: dict[int, tuple], drop: set[str]) -> None:
        """Lay out a cycle: a slice for every live storage not dropped; grow the buffer if needed."""
        self._layout, end = {}, 0
        for ptr, (_, n, kind) in live.items():
            if kind not in drop:
                self._layout[ptr] = end
                end += _round_up(n)
        if end > self.host_bytes:
            self.release_host()  # empty between cycles: free (and unpin) it before the new one
            pin = self.device == "cuda"
            self._host = allocate_host(end, pin)
            # unpins when released, or when the offloader goes (the finalizer holds the buffer till then)
            self._unpin = weakref.finalize(self, _unregister, self._host) if pin and end else None

    def release_host(self) -> None:
        """Free the host buffer (only while nothing is offloaded)."""
        if self._out:
            raise RuntimeError("release_host: storages are offloaded into the host buffer")
        if self._unpin is not None:
            self._unpin()
        self._host = self._unpin = None

    def offload(self, tensors: dict[str, list[torch.Tensor]], kinds: Iterable[str],
                drop: Iterable[str] = ()) -> dict:
        """Copy the storages of ``kinds`` to the host buffer and free them; free those of ``drop``
        without a copy (onload re-creates them zeroed).

        Returns, for this call: ``bytes`` copied, ``dropped_bytes``, ``storages`` freed, per kind
        ``<kind>_bytes`` freed (copied or dropped), ``seconds``; and the state after it:
        ``host_bytes`` (the buffer), ``storage_bytes`` (what it holds now).
        """
        kinds, drop = set(kinds), set(drop)
        if kinds & drop:
            raise ValueError(f"kinds both copied and dropped: {sorted(kinds & drop)}")
        t0 = time.perf_counter()
        cuda = self.device == "cuda"
        live = self._live_storages(tensors)
        todo = [(ptr, st, n, kind) for ptr, (st, n, kind) in live.items() if kind in kinds | drop]
        if todo and not self._out:
            self._plan(live, drop)
        slots = []
        for ptr, st, n, kind in todo:
            if kind in drop:
                slots.append(_Slot(st, n, kind, None))
                continue
            if ptr not in self._layout:
                raise RuntimeError(f"a {kind} storage of {n} bytes appeared while offloaded; onload first")
            off = self._layout[ptr]
            self._host[off:off + n].copy_(_bytes_view(st, n), non_blocking=cuda)
            slots.append(_Slot(st, n, kind, off))
        if cuda and slots:
            torch.cuda.synchronize()  # every copy must land before its source is freed
        for s in slots:
            s.storage.resize_(0)
        self._out.extend(slots)  # (the caller empties the CUDA cache, so that vLLM can take the memory)
        copied = sum(s.nbytes for s in slots if s.offset is not None)
        return {"bytes": copied, "dropped_bytes": sum(s.nbytes for s in slots) - copied,
                "storages": len(slots), "seconds": time.perf_counter() - t0,
                **{f"{k}_bytes": sum(s.nbytes for s in slots if s.kind == k) for k in KINDS},
                "host_bytes": self.host_bytes, "storage_bytes": self.storage_bytes}

    def onload(self) -> dict:
        """Reallocate every offloaded storage: copied ones get their bytes back (bit-identical),
        dropped ones are zero-filled. Returns ``bytes`` copied back, ``zeroed_bytes``,
        ``storages``, ``seconds``, ``host_bytes``."""
        t0 = time.perf_counter()
        cuda = self.device == "cuda"
        for s in self._out:
            s.storage.resize_(s.nbytes)
            view = _bytes_view(s.storage, s.nbytes)
            if s.offset is None:
                view.zero_()
            else:
                view.copy_(self._host[s.offset:s.offset + s.nbytes], non_blocking=cuda)
        if cuda and self._out:
            torch.cuda.synchronize()
        done, self._out = self._out, []
        copied = sum(s.nbytes for s in done if s.offset is not None)
        return {"bytes": copied, "zeroed_bytes": sum(s.nbytes for s in done) - copied, "storages": len(done),
                "seconds": time.perf_counter() - t0, "host_bytes": self.host_bytes}


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

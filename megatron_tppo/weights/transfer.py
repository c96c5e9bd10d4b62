"""Weights from trainer to engine over a process group of their own: buckets on the wire.

One transfer group per policy pipeline stage. Rank 0 is that stage's sender (its TP-rank-0 /
DP-rank-0 trainer rank); ranks 1.. are every worker of every rollout engine (an engine with TP=k
brings k ranks; each vLLM worker loads its own TP shard from the full tensors it receives). The
group is created from a TCPStore that the sender hosts and is never torch's default group, so it
touches neither megatron's groups on the trainer nor vLLM's inside the engine workers.

Wire format, per sync and stage: for each bucket, a pickled :class:`Slot` list (names, dtypes,
shapes, byte offsets) and then ONE flat uint8 buffer holding all its tensors; ``None`` ends the
stage. Buckets hold whole megatron modules (``...linear_qkv``'s weight and bias, ``linear_fc1``'s
gate and up) as :func:`megatron_tppo.weights.buckets.hf_buckets` forms them, so every vLLM layer is
complete inside one bucket and vLLM's layer-wise reload processes it before the next bucket
arrives.

Memory: the sender plans the buckets once from the parameters' full shapes on the ``meta`` device
(:func:`plan_stage`), then gathers one parameter at a time (a TP collective), copies its HF
tensors straight into the current bucket's flat buffer and drops it; so beyond the model it holds
one bucket plus the parameter being gathered. A receiver allocates a fresh buffer per bucket and
yields views into it; the buffer dies once vLLM has processed the layers viewing it and dropped
its last reference. Measured (``TransferStats.peak_live_bytes``, through the buffers' storages):
vLLM's loader (its nested per-prefix grouping) keeps the last tensors it loaded referenced for a
few more tensors, so a receiver holds two buckets in the steady state and three at the end of a
stage: a small constant number of buckets, whatever the model size. Exception: vLLM keeps a layer
whose loaded size falls short of its parameter (an embedding whose vocabulary vLLM pads to a
multiple of 64) until the end of the reload, and with it that bucket.

Transports (``rollout.weight_transport``), one interface: ``gloo`` moves host buffers (CPU, and
the CPU-staged fallback on GPU, which also works for colocated engines and across nodes); ``nccl``
runs the same collective code on CUDA buffers. NCCL refuses two ranks on one GPU ("Duplicate GPU
detected"), so it cannot include an engine worker that sits on its sender's GPU (colocated).
``ipc`` (:mod:`megatron_tppo.weights.ipc`) fills the same buckets in memory other processes can
map (CUDA IPC on GPU, shared memory on CPU) and broadcasts only handles over the group's gloo
channel, then waits for every receiver's ack; only for receivers on the sender's node.
"""
from __future__ import annotations

import datetime
import pickle
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

from megatron_tppo.config import ModelConfig

TRANSPORTS = ("auto", "gloo", "nccl", "ipc")
ALIGN = 64  # byte alignment of every tensor inside a flat buffer (any dtype view, vector loads)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_transport(requested: str, device: str) -> str:
    """``rollout.weight_transport`` -> the transport to build: ``gloo``, ``nccl`` or ``ipc``.

    auto: nccl on cuda (``WeightSync`` then picks ipc or gloo for colocated engines), gloo on cpu.
    nccl needs cuda. ipc: CUDA IPC on cuda, shared memory on cpu (same node only, checked by the
    caller, which knows where the engines run).
    """
    if requested not in TRANSPORTS:
        raise ValueError(f"weight transport must be one of {TRANSPORTS}, got {requested!r}")
    if requested == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if requested == "nccl" and device != "cuda":
        raise ValueError(f"rollout.weight_transport=nccl needs CUDA, but the device is {device!r}; use gloo")
    return requested


# ---------------------------------------------------------------------------------------------
# Bucket layouts (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor sits in a bucket's flat byte buffer."""

    name: str
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``."""
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the flat buffer (a multiple of :data:`ALIGN`)."""

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * DTYPES[self.dtype].itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into ``flat`` (uint8)."""
        return flat[self.offset:self.offset + self.nbytes].view(DTYPES[self.dtype]).view(self.shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot transfer dtype {dtype}; supported: {sorted(DTYPES)}")
    return name


def layout(pairs: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[Slot], int]:
    """(name, tensor or meta tensor) pairs -> their slots in one flat buffer and its size in bytes."""
    slots, offset = [], 0
    for name, t in pairs:
        slot = Slot(name, _dtype_name(t.dtype), tuple(int(s) for s in t.shape), offset)
        slots.append(slot)
        offset += -(-slot.nbytes // ALIGN) * ALIGN
    return slots, offset


@dataclass
class StagePlan:
    """The buckets one pipeline stage sends, planned once from parameter shapes."""

    buckets: list[list[Slot]]
    sizes: list[int]
    """Flat-buffer bytes of each bucket."""
    bucket_of: dict[str, int]
    """Megatron parameter name -> index of the bucket its HF tensors go to."""
    sources: list[int]
    """Number of megatron parameters feeding each bucket."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for b in self.buckets for s in b)


def plan_stage(specs: Sequence[tuple[str, Sequence[int], torch.dtype]], m: ModelConfig, bucket_bytes: int) -> StagePlan:
    """Bucket layout of a stage from ``(global megatron name, full shape, dtype)`` in gather order.

    Runs the real name/layout map (:func:`~megatron_tppo.weights.hf_mapping.megatron_to_hf`) and
    the real bucketing (:func:`~megatron_tppo.weights.buckets.hf_buckets`) on meta tensors, so the
    plan is what a sync of the real tensors produces, without touching any data.
    """
    from megatron_tppo.weights.buckets import hf_buckets
    from megatron_tppo.weights.hf_mapping import megatron_to_hf

    metas = [(name, torch.empty(tuple(shape), dtype=dtype, device="meta")) for name, shape, dtype in specs]
    source = {hf: name for name, t in metas for hf, _ in megatron_to_hf(name, t, m)}
    buckets, sizes, bucket_of, counts = [], [], {}, []
    for i, bucket in enumerate(hf_buckets(iter(metas), m, bucket_bytes)):
        slots, size = layout(bucket)
        buckets.append(slots)
        sizes.append(size)
        names = list(dict.fromkeys(source[s.name] for s in slots))
        bucket_of.update({n: i for n in names})
        counts.append(len(names))
    return StagePlan(buckets, sizes, bucket_of, counts)


def full_param_specs(module, tp: int, dtype: Optional[torch.dtype] = None) -> list[tuple[str, tuple, torch.dtype]]:
    """``(global name, full shape, dtype)`` of what :func:`~megatron_tppo.weights.gather.iter_full_params`
    yields for this stage, in the same order, without gathering (TP-split dims times ``tp``)."""
    from megatron_tppo.weights.gather import _global_name  # the one place that numbers layers globally

    tied = getattr(module, "share_embeddings_and_output_weights", False)
    out = []
    for name, p in module.named_parameters():
        if name.startswith("output_layer.") and tied:
            continue
        shape = list(p.shape)
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= tp
        out.append((_global_name(module, name), tuple(shape), dtype or p.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------


def local_address(peer_host: str) -> str:
    """This machine's IP on the interface that reaches ``peer_host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer_host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def open_store(host: str, port: int = 0, timeout_s: float = 600.0):
    """The sender's side of the rendezvous: a TCPStore server on ``host`` (port 0 picks a free
    one; read it back from ``.port``). Returns at once; :meth:`TransferGroup.join` waits for peers."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False)


class TransferGroup:
    """A standalone gloo or NCCL group: rank 0 broadcasts, every other rank receives.

    Build it with :meth:`join` on every rank (the sender passes the store from :func:`open_store`,
    receivers the ``(host, port)`` the sender reported). ``device`` is where the collectives'
    buffers live: cpu for gloo and ipc (whose group carries only handles and acks), the rank's
    CUDA device for nccl.
    """

    def __init__(self, backend: str, store, rank: int, world_size: int, timeout_s: float):
        from torch.distributed import PrefixStore

        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.wire_bytes = 0  # bytes this rank put into / took out of the group's collectives
        prefixed = PrefixStore(f"tppo_weights/{backend}", store)
        if backend in ("gloo", "ipc"):  # ipc: handles and acks over gloo, the buckets stay in place
            self.device = torch.device("cpu")
            self.pg = _gloo_group(prefixed, rank, world_size, self.timeout, store)
        elif backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = self.timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, world_size, opts)
        else:
            raise ValueError(f"transfer backend must be gloo, nccl or ipc, got {backend!r}")
        self._store = store  # the sender's store serves the group: keep it alive

    @classmethod
    def join(cls, backend: str, rank: int, world_size: int, *, store=None, address: Optional[tuple[str, int]] = None,
             timeout_s: float = 600.0) -> "TransferGroup":
        """Join as ``rank`` (blocks until all ``world_size`` ranks joined)."""
        if store is None:
            from torch.distributed import TCPStore

            if address is None:
                raise ValueError("a receiver needs the sender's (host, port)")
            store = TCPStore(address[0], int(address[1]), None, is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
        return cls(backend, store, rank, world_size, timeout_s)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place broadcast from rank 0 (the tensor must be on :attr:`device`)."""
        self.pg.broadcast(tensor, 0).wait()
        self.wire_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def ack(self, value: int) -> int:
        """Sum of every rank's ``value`` (an all-reduce): the receivers' acknowledgement."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self.pg.allreduce([t]).wait()
        self.wire_bytes += t.numel() * t.element_size()
        return int(t.item())

    def broadcast_object(self, obj=None):
        """Rank 0's picklable ``obj`` on every rank (small control data: bucket layouts)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
            self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
            self.broadcast(data)
            return obj
        n = self.broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))
        data = self.broadcast(torch.empty(int(n.item()), dtype=torch.uint8, device=self.device))
        return pickle.loads(data.cpu().numpy().tobytes())

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and self.backend == "nccl" and hasattr(pg, "shutdown"):
            pg.shutdown()
        self._store = None


def _gloo_group(store, rank: int, world_size: int, timeout: datetime.timedelta, raw_store):
    from torch.distributed import ProcessGroupGloo

    try:  # bind to the interface that reaches the sender (multi-node; hostname lookups can pick loopback)
        host = raw_store.host if hasattr(raw_store, "host") else "127.0.0.1"
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=local_address(host))]
        return ProcessGroupGloo(store, rank, world_size, opts)
    except (AttributeError, TypeError):  # a torch without the options API: its default device
        return ProcessGroupGloo(store, rank, world_size, timeout)


# ---------------------------------------------------------------------------------------------
# Sending and receiving
# ---------------------------------------------------------------------------------------------


@dataclass
class TransferStats:
    """One side of one stage's transfer (or the sum over stages)."""

    bytes: int = 0
    """Bytes of tensors moved (without alignment padding)."""
    wire_bytes: int = 0
    """Bytes through the group's collectives (headers and acks included): the payload plus a
    little for gloo/nccl, only handles and acks for ipc."""
    buckets: int = 0
    tensors: int = 0
    wire_s: float = 0.0
    """Seconds inside the group's collectives (waiting for peers included)."""
    seconds: float = 0.0
    """Wall time of the whole transfer on this side."""
    bucket_bytes: list[int] = field(default_factory=list)
    peak_live_bytes: int = 0
    """Most bytes of transfer buffers alive at once (receivers: buckets whose views the engine still
    holds, tracked through the buffers' storages)."""
    live: list = field(default_factory=list, repr=False)
    """Receivers: (weak reference to a bucket's storage, bytes) of buckets that may still be alive."""

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "wire_bytes": self.wire_bytes, "buckets": self.buckets, "tensors": self.tensors,
                "wire_s": self.wire_s, "seconds": self.seconds, "max_bucket_bytes": max(self.bucket_bytes, default=0),
                "peak_live_bytes": self.peak_live_bytes}


def _new_buffer(group: TransferGroup, nbytes: int, like: torch.Tensor) -> torch.Tensor:
    """A bucket's flat buffer: on the group's device, or for ipc one that other processes can map,
    where the weights are (``like``'s device)."""
    if group.backend == "ipc":
        from megatron_tppo.weights.ipc import shared_buffer

        return shared_buffer(nbytes, like.device)
    return torch.empty(nbytes, dtype=torch.uint8, device=group.device)


def _send_bucket(group: TransferGroup, slots: list[Slot], flat: torch.Tensor, stats: TransferStats) -> None:
    if group.backend == "ipc":
        from megatron_tppo.weights import ipc

        ipc.send_bucket(group, slots, flat, stats)
    else:
        t0 = time.perf_counter()
        group.broadcast_object((slots, flat.numel()))
        group.broadcast(flat)
        stats.wire_s += time.perf_counter() - t0
    stats.buckets += 1
    stats.tensors += len(slots)
    stats.bytes += sum(s.nbytes for s in slots)
    stats.bucket_bytes.append(flat.numel())
    stats.peak_live_bytes = max(stats.peak_live_bytes, flat.numel())  # a sender holds one buffer at a time


def _end_stage(group: TransferGroup, stats: TransferStats) -> None:
    t0 = time.perf_counter()
    group.broadcast_object(None)
    stats.wire_s += time.perf_counter() - t0


@torch.no_grad()
def send_planned(group: TransferGroup, full_params: Iterable[tuple[str, torch.Tensor]], plan: StagePlan,
                 m: ModelConfig) -> TransferStats:
    """Sender: pack the gathered ``(megatron name, full tensor)`` stream into the planned buckets and
    broadcast each as soon as its last parameter is in (one bucket alive at a time)."""
    from megatron_tppo.weights.hf_mapping import megatron_to_hf

    stats, t_start, wire0 = TransferStats(), time.perf_counter(), group.wire_bytes
    slot_of = {s.name: s for b in plan.buckets for s in b}
    current, flat, missing = -1, None, 0
    for name, tensor in full_params:
        pairs = megatron_to_hf(name, tensor, m)
        if not pairs:
            continue
        index = plan.bucket_of.get(name)
        if index is None or (flat is None and index != current + 1) or (flat is not None and index != current):
            raise RuntimeError(f"weight transfer: {name!r} does not follow the stage's plan (bucket {index}, "
                               f"expected {current + 1 if flat is None else current}); the plan is stale")
        if flat is None:
            current, missing = index, plan.sources[index]
            flat = _new_buffer(group, plan.sizes[index], tensor)
        for hf_name, t in pairs:
            slot_of[hf_name].view(flat).copy_(t)
        del pairs, tensor
        missing -= 1
        if missing == 0:
            _send_bucket(group, plan.buckets[current], flat, stats)
            flat = None
    if flat is not None or current != len(plan.buckets) - 1:
        raise RuntimeError(f"weight transfer: the stage yielded {current + 1} of {len(plan.buckets)} planned buckets")
    _end_stage(group, stats)
    stats.seconds = time.perf_counter() - t_start
    stats.wire_bytes = group.wire_bytes - wire0
    return stats


@torch.no_grad()
def send_buckets(group: TransferGroup, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> TransferStats:
    """Sender: broadcast ready-made buckets of (HF name, tensor) (engine-local reloads)."""
    stats, t_start, wire0 = TransferStats(), time.perf_counter(), group.wire_bytes
    for bucket in buckets:
        slots, size = layout(bucket)
        flat = _new_buffer(group, size, bucket[0][1])
        for slot, (_, t) in zip(slots, bucket):
            slot.view(flat).copy_(t)
        _send_bucket(group, slots, flat, stats)
        del flat
    _end_stage(group, stats)
    stats.seconds = time.perf_counter() - t_start
    stats.wire_bytes = group.wire_bytes - wire0
    return stats


def receive(group: TransferGroup, stats: Optional[TransferStats] = None,
            device: Optional[torch.device] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver: yield ``(HF name, tensor)`` views of each bucket as it arrives, until the stage ends.

    A fresh buffer per bucket (never reused): the consumer may keep views of a bucket while the
    next one arrives. ``device`` (default: the group's) is where the views live. Over ipc the
    buffer is the sender's own, mapped into this process (a CUDA handle on ``device``).
    """
    stats = stats if stats is not None else TransferStats()
    wire0 = group.wire_bytes
    try:
        yield from _receive(group, stats, device)
    finally:
        stats.wire_bytes += group.wire_bytes - wire0


def _arrivals(group: TransferGroup, stats: TransferStats, device) -> Iterator[tuple[list[Slot], torch.Tensor]]:
    if group.backend == "ipc":
        from megatron_tppo.weights import ipc

        yield from ipc.receive(group, stats, device)
        return
    while True:
        t0 = time.perf_counter()
        header = group.broadcast_object()
        if header is None:
            stats.wire_s += time.perf_counter() - t0
            return
        slots, size = header
        flat = group.broadcast(torch.empty(size, dtype=torch.uint8, device=group.device))
        stats.wire_s += time.perf_counter() - t0
        yield slots, flat
        del flat


def _receive(group: TransferGroup, stats: TransferStats, device) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.multiprocessing.reductions import StorageWeakRef

    for slots, flat in _arrivals(group, stats, device):
        size = flat.numel()
        if device is not None and flat.device != device:
            flat = flat.to(device)
        # earlier buckets stay alive while the engine holds views of them
        stats.live = [(ref, n) for ref, n in stats.live if not ref.expired()]
        stats.live.append((StorageWeakRef(flat.untyped_storage()), size))
        stats.peak_live_bytes = max(stats.peak_live_bytes, sum(n for _, n in stats.live))
        stats.buckets += 1
        stats.tensors += len(slots)
        stats.bytes += sum(s.nbytes for s in slots)
        stats.bucket_bytes.append(flat.numel())
        for slot in slots:
            yield slot.name, slot.view(flat)
        del flat


class StageSender:
    """One trainer rank's part in sending its pipeline stage to the engines.

    Every rank of DP replica 0 takes part (the TP gather is collective over the stage's TP group);
    its TP-rank-0 rank (``is_sender``) hosts the group's rendezvous, packs and broadcasts. Ranks of
    other DP replicas hold the same weights and stay out. Call order: :meth:`open` (sender: returns
    the address for the receivers), :meth:`join` (with the receivers, concurrently), then
    :meth:`send` once per sync on all ranks of the replica, :meth:`close` at the end.
    """

    def __init__(self, module, tp_group, tp: int, m: ModelConfig, *, is_sender: bool, takes_part: bool,
                 dtype: Optional[torch.dtype] = None):
        self.module, self.tp_group, self.tp, self.m = module, tp_group, tp, m
        self.is_sender, self.takes_part, self.dtype = is_sender, takes_part, dtype
        self.store = self.group = None
        self._plan: Optional[tuple[int, StagePlan]] = None

    def open(self, host: str, port: int = 0, timeout_s: float = 600.0) -> Optional[tuple[str, int]]:
        if not self.is_sender:
            return None
        self.close()
        self.store = open_store(host, port, timeout_s)
        return host, int(self.store.port)

    def join(self, backend: str, world_size: int, timeout_s: float = 600.0) -> None:
        if self.is_sender:
            self.group = TransferGroup.join(backend, 0, world_size, store=self.store, timeout_s=timeout_s)

    def plan(self, bucket_bytes: int) -> StagePlan:
        if self._plan is None or self._plan[0] != bucket_bytes:
            self._plan = bucket_bytes, plan_stage(full_param_specs(self.module, self.tp, self.dtype), self.m, bucket_bytes)
        return self._plan[1]

    def send(self, bucket_bytes: int) -> dict:
        """One sync of this stage. Returns (sender) bytes, buckets, gather/wire seconds, memory growth."""
        from megatron_tppo.weights.gather import iter_full_params

        if not self.takes_part:
            return {"role": "idle"}
        gather_s = 0.0

        def timed(it):
            nonlocal gather_s
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    gather_s += time.perf_counter() - t0
                yield item

        t0 = time.perf_counter()
        with PeakMemory() as mem:
            full = timed(iter_full_params(self.module, self.tp_group, dtype=self.dtype))
            if not self.is_sender:
                for _ in full:  # the TP gather is collective: keep step with the sender
                    pass
                stats = TransferStats()
            else:
                if self.group is None:
                    raise RuntimeError("send() before join(): the stage's transfer group does not exist")
                stats = send_planned(self.group, full, self.plan(bucket_bytes), self.m)
        out = {**stats.as_dict(), "role": "sender" if self.is_sender else "gather", "gather_s": gather_s,
               "seconds": time.perf_counter() - t0, **mem.as_dict()}
        if self.is_sender and self.group.device.type == "cuda":
            torch.cuda.synchronize()  # the last bucket left before the caller touches the weights again
        return out

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.store = self.group = None


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> tuple[int, int]:
    """(current, peak since the last :func:`reset_peak_rss`) resident set of this process, bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


class PeakMemory:
    """Growth of this process's memory during a ``with`` block: peak RSS above the start, and on
    CUDA the peak of tracked allocations above the start. ``.as_dict()`` after the block."""

    def __enter__(self) -> "PeakMemory":
        self.rss_reset = reset_peak_rss()
        self.rss0 = rss_bytes()[0]
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        cur, peak = rss_bytes()
        self.rss_end, self.rss_peak = cur, peak if self.rss_reset else max(cur, self.rss0)
        if self.cuda:
            self.cuda_growth = torch.cuda.max_memory_allocated() - self.cuda0

    def as_dict(self) -> dict:
        out = {"rss_start_bytes": self.rss0, "rss_peak_bytes": self.rss_peak,
               "rss_growth_bytes": self.rss_peak - self.rss0, "rss_peak_valid": self.rss_reset}
        if self.cuda:
            out["cuda_growth_bytes"] = self.cuda_growth
        return out

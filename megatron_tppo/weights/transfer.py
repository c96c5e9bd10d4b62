"""Weights from the trainer ranks to the engine workers: pack buckets, move them, unpack them.

The two routes of :mod:`megatron_tppo.weight_route`, one sender class each, over the transports
of :mod:`megatron_tppo.weights.transports` and the bucket plans of
:mod:`megatron_tppo.weights.bucket_plan`:

- :class:`StageSender` (``broadcast``): the TP-rank-0 rank of DP replica 0 of each pipeline
  stage sends its stage to every engine worker (one group per stage: the sender and all workers);
  its TP peers take part in the gather only.
- :class:`LocalSender` (``local``): every policy rank assembles the whole model, bucket by bucket,
  over the trainer's own process groups (each stage TP-gathers its parameters into a bucket,
  then broadcasts it to the ranks of the other stages over the PP group) and hands each bucket to
  the engine worker on its own GPU (a group of two, transport ipc). Every bucket moves in step on
  all ranks, so no collective waits behind a whole stage's.

Memory: a sender plans the buckets once from the parameters' full shapes on the ``meta`` device,
then gathers one parameter at a time (a TP collective), copies its HF tensors straight into the
current bucket's flat buffer and drops it: beyond the model it holds one bucket plus the
parameter being gathered. A receiver yields views into each bucket (a fresh buffer per bucket,
never reused); a bucket dies once vLLM has processed the layers viewing it and dropped its last
reference. Measured (``TransferStats.peak_live_bytes``, through the buffers' storages): vLLM's
loader keeps the last tensors it loaded referenced for a few more tensors, so a receiver holds two
buckets in the steady state and three at the end: a small constant, whatever the model size. A
layer whose loaded size falls short of its parameter (an embedding padded to a multiple of 64)
stays until the end of the reload, and with it that bucket.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights.bucket_plan import StagePlan, full_param_specs, layout, plan_stage
from megatron_tppo.weights.memprobe import PeakMemory
from megatron_tppo.weights.transports import Transport, TransferStats, join, open_store


@torch.no_grad()
def pack(full_params: Iterable[tuple[str, torch.Tensor]], plan: StagePlan, m: ModelConfig,
         buffer: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """The gathered ``(megatron name, full tensor)`` stream packed into the planned buckets:
    ``(bucket index, flat buffer)`` as soon as a bucket's last parameter is in (one alive at a time)."""
    from megatron_tppo.weights.hf_mapping import megatron_to_hf

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
            flat = buffer(plan.sizes[index], tensor)
        for hf_name, t in pairs:
            slot_of[hf_name].view(flat).copy_(t)
        del pairs, tensor
        missing -= 1
        if missing == 0:
            yield current, flat
            flat = None
    if flat is not None or current != len(plan.buckets) - 1:
        raise RuntimeError(f"weight transfer: the stage yielded {current + 1} of {len(plan.buckets)} planned buckets")


def send_planned(transport: Transport, full_params: Iterable[tuple[str, torch.Tensor]], plan: StagePlan,
                 m: ModelConfig) -> TransferStats:
    """Sender: the gathered stream packed into the planned buckets, each sent when full, then the end."""
    stats, t0, wire0 = transport.begin(), time.perf_counter(), transport.group.wire_bytes
    for index, flat in pack(full_params, plan, m, transport.buffer):
        transport.send(plan.buckets[index], flat)
        del flat
    transport.end()
    stats.seconds = time.perf_counter() - t0
    stats.wire_bytes = transport.group.wire_bytes - wire0
    return stats


@torch.no_grad()
def send_buckets(transport: Transport, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> TransferStats:
    """Sender: ready-made buckets of (HF name, tensor), then the end (engine-local reloads, tools)."""
    stats, t0, wire0 = transport.begin(), time.perf_counter(), transport.group.wire_bytes
    for bucket in buckets:
        slots, size = layout(bucket)
        flat = transport.buffer(size, bucket[0][1])
        for slot, (_, t) in zip(slots, bucket):
            slot.view(flat).copy_(t)
        transport.send(slots, flat)
        del flat
    transport.end()
    stats.seconds = time.perf_counter() - t0
    stats.wire_bytes = transport.group.wire_bytes - wire0
    return stats


def receive(transport: Transport, stats: Optional[TransferStats] = None,
            device: Optional[torch.device] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver: ``(HF name, tensor)`` views of each bucket as it arrives, until the sender's end.

    ``device`` (default: the group's) is where the views live. Over ipc the buffer is the
    sender's own, mapped into this process (a CUDA handle opened on ``device``).
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    stats = stats if stats is not None else TransferStats()
    mine = transport.begin()
    wire0 = transport.group.wire_bytes
    try:
        for slots, flat in transport.arrivals(device):
            if device is not None and flat.device != device:
                flat = flat.to(device)
            # earlier buckets stay alive while the engine holds views of them
            stats.live = [(ref, n) for ref, n in stats.live if not ref.expired()]
            stats.live.append((StorageWeakRef(flat.untyped_storage()), flat.numel()))
            stats.peak_live_bytes = max(stats.peak_live_bytes, sum(n for _, n in stats.live))
            stats.sent(slots, flat.numel())
            for slot in slots:
                yield slot.name, slot.view(flat)
            del flat
    finally:
        stats.wire_s += mine.wire_s
        stats.wire_bytes += transport.group.wire_bytes - wire0


def _timed(it: Iterator, clock: list) -> Iterator:
    """``it`` with the seconds spent producing its items added to ``clock[0]``."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            clock[0] += time.perf_counter() - t0
        yield item


class _Sender:
    """What both senders share: the rendezvous, the transport, one sync's bookkeeping."""

    def __init__(self, module, tp_group, tp: int, m: ModelConfig, dtype: Optional[torch.dtype]):
        self.module, self.tp_group, self.tp, self.m, self.dtype = module, tp_group, tp, m, dtype
        self.store = self.transport = None
        self._plans: dict[int, object] = {}

    def open(self, host: str, timeout_s: float = 600.0) -> tuple[str, int]:
        self.close()
        self.store = open_store(host, 0, timeout_s)
        return host, int(self.store.port)

    def join(self, backend: str, world_size: int, timeout_s: float, names: dict[int, str], stage: str) -> None:
        self.transport = join(backend, 0, world_size, store=self.store, timeout_s=timeout_s,
                              names={int(k): v for k, v in names.items()}, stage=stage)

    def own_plan(self, bucket_bytes: int) -> StagePlan:
        if bucket_bytes not in self._plans:
            self._plans[bucket_bytes] = plan_stage(full_param_specs(self.module, self.tp, self.dtype), self.m, bucket_bytes)
        return self._plans[bucket_bytes]

    def full_params(self, clock: list) -> Iterator[tuple[str, torch.Tensor]]:
        from megatron_tppo.weights.gather import iter_full_params

        return _timed(iter_full_params(self.module, self.tp_group, dtype=self.dtype), clock)

    def report(self, role: str, stats: TransferStats, clock: list, t0: float, mem: PeakMemory) -> dict:
        out = {**stats.as_dict(), "role": role, "gather_s": clock[0], "seconds": time.perf_counter() - t0,
               **mem.as_dict()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the last bucket left before the caller touches the weights again
        return out

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.store = self.transport = None


class StageSender(_Sender):
    """One trainer rank's part in the ``broadcast`` route: DP replica 0 gathers its stage (a TP
    collective); its TP-rank-0 rank (``is_sender``) hosts the group, packs and sends. Ranks of
    other replicas hold the same weights and stay out."""

    def __init__(self, module, tp_group, tp: int, m: ModelConfig, *, is_sender: bool, takes_part: bool,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(module, tp_group, tp, m, dtype)
        self.is_sender, self.takes_part = is_sender, takes_part

    def send(self, bucket_bytes: int) -> dict:
        if not self.takes_part:
            return {"role": "idle"}
        clock, t0 = [0.0], time.perf_counter()
        with PeakMemory() as mem:
            full = self.full_params(clock)
            if not self.is_sender:
                for _ in full:  # the TP gather is collective: keep step with the sender
                    pass
                stats = TransferStats()
            else:
                if self.transport is None:
                    raise RuntimeError("send() before join(): the stage's transfer group does not exist")
                stats = send_planned(self.transport, full, self.own_plan(bucket_bytes), self.m)
        return self.report("sender" if self.is_sender else "gather", stats, clock, t0, mem)


class LocalSender(_Sender):
    """One policy rank's part in the ``local`` route (module docstring). ``pp_group``: megatron's
    pipeline group of this rank (its ranks in stage order); ``has_receiver``: an engine worker
    sits on this rank's GPU (every rank gathers and relays; only those hand buckets over)."""

    def __init__(self, module, tp_group, pp_group, tp: int, m: ModelConfig, *, has_receiver: bool,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(module, tp_group, tp, m, dtype)
        self.pp_group, self.has_receiver = pp_group, has_receiver
        self._all_plans: dict[int, list[StagePlan]] = {}

    def plans(self, bucket_bytes: int) -> list[StagePlan]:
        """Every stage's bucket plan, in stage order (the stages' parameter shapes exchanged once)."""
        import torch.distributed as dist

        if bucket_bytes not in self._all_plans:
            specs = full_param_specs(self.module, self.tp, self.dtype)
            every = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(every, specs, group=self.pp_group)
            self._all_plans[bucket_bytes] = [plan_stage(s, self.m, bucket_bytes) for s in every]
        return self._all_plans[bucket_bytes]

    def send(self, bucket_bytes: int) -> dict:
        import torch.distributed as dist

        plans = self.plans(bucket_bytes)
        ranks = dist.get_process_group_ranks(self.pp_group)
        me = ranks.index(dist.get_rank())
        t = self.transport
        if self.has_receiver and t is None:
            raise RuntimeError("send() before join(): this rank's transfer group does not exist")
        stats = t.begin() if t is not None else TransferStats()
        wire0 = t.group.wire_bytes if t is not None else 0
        clock, relay_s, t0 = [0.0], 0.0, time.perf_counter()
        device = next(self.module.parameters()).device
        buffer = t.buffer if t is not None else (lambda n, like: torch.empty(n, dtype=torch.uint8, device=like.device))
        like = torch.empty(0, device=device)
        with PeakMemory() as mem:
            for stage, plan in enumerate(plans):
                if stage == me:
                    buckets = pack(self.full_params(clock), plan, self.m, buffer)
                else:
                    buckets = ((i, buffer(size, like)) for i, size in enumerate(plan.sizes))
                for index, flat in buckets:
                    if len(ranks) > 1:  # this bucket reaches the ranks of the other stages
                        r0 = time.perf_counter()
                        dist.broadcast(flat, src=ranks[stage], group=self.pp_group)
                        relay_s += time.perf_counter() - r0
                    if t is not None:
                        t.send(plan.buckets[index], flat)
                    else:
                        stats.sent(plan.buckets[index], flat.numel())
                    del flat
            if t is not None:
                t.end()
                stats.wire_bytes = t.group.wire_bytes - wire0
        return {**self.report("local" if t is not None else "relay", stats, clock, t0, mem), "relay_s": relay_s}

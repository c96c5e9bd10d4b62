"""Methods vLLM mixes into every one of its workers (``LLM(worker_extension_cls=...)``).

Why a worker extension and not vLLM 0.32's weight-transfer engines
(``vllm/distributed/weight_transfer/``, ``init_weight_transfer_engine`` / ``update_weights``):

* Those engines load each chunk with ``model.load_weights`` between ``start_weight_update`` and
  ``finish_weight_update``, the same layer-wise reload as ``reload_weights`` below, so they gain
  nothing on the load side.
* Their group holds ONE sender (rank 0, ``rank_offset=1`` for the workers) per engine instance and
  a worker holds one engine, while a pipeline-parallel policy has one sender per stage, and in the
  local route each worker of an engine has a sender of its own (the policy rank on its GPU); every
  chunk is a separate ``update_weights`` RPC whose payload (names, dtypes, shapes) the trainer
  ships through the engine's control plane. Here a worker joins one group per stage and one
  ``collective_rpc`` per sync drains them all from a single lazy generator.
* There is no gloo engine: the nccl engine builds vLLM's PyNcclCommunicator (CUDA only) and a
  custom one would have to be registered in every worker process (``register_engine`` is
  per-process), which needs code running in the workers anyway: this extension.
* ``update_weights`` ends with ``torch.accelerator.synchronize()`` and the worker must be started
  with a ``weight_transfer_config``; the extension needs neither.

So each worker joins standalone process groups (:mod:`megatron_tppo.weights.transports`: gloo,
NCCL, or ipc, where the worker maps the sender's buffers from the handles it receives, CUDA IPC on
its own device, shared memory on CPU; from the sender's TCPStore; vLLM's own groups untouched)
and feeds ONE
generator that receives bucket after bucket into ``reload_weights(weights_iterator=...,
is_checkpoint_format=True)``: vLLM re-runs its per-layer processing (the oneDNN packing on CPU,
quantization on GPU) as each layer completes, so memory grows by about one bucket.

Method names carry a ``tppo_`` prefix: vLLM refuses an extension attribute the worker already has.
"""
from __future__ import annotations

import os
import time

import torch


class WeightReceiverExtension:
    """Weight-transfer endpoints of one vLLM worker (``self`` is the vLLM Worker)."""

    def tppo_device(self) -> dict:
        """This worker's rank in its engine and its device (GPU UUID on CUDA, for NCCL's one-rank-per-GPU rule)."""
        dev = getattr(self, "device", torch.device("cpu"))
        uuid = str(torch.cuda.get_device_properties(dev).uuid) if dev.type == "cuda" else None
        return {"rank": int(self.rank), "device": str(dev), "uuid": uuid, "pid": os.getpid()}

    def tppo_join_transfer(self, key: str, plan: dict) -> dict:
        """Join this worker's transfer groups, in the order their buckets arrive.

        ``plan``: worker rank -> its groups, each ``{"backend", "host", "port", "world_size",
        "timeout_s", "rank"}`` (the broadcast route: one group per pipeline stage, the same for
        every worker of the engine but its rank; the local route: one group with the policy rank
        on this worker's GPU). Blocks until every rank of each group joined. ``key`` names the set
        (a run's sync and an engine-local reload each keep their own).
        """
        from megatron_tppo.weights.transports import join

        self.tppo_close_transfer(key)
        mine = plan[int(self.rank)] if int(self.rank) in plan else plan[str(int(self.rank))]
        joined = [join(g["backend"], int(g["rank"]), int(g["world_size"]), address=(g["host"], int(g["port"])),
                       timeout_s=float(g["timeout_s"])) for g in mine]
        self._tppo_groups = {**getattr(self, "_tppo_groups", {}), key: joined}
        return {"ranks": [int(g["rank"]) for g in mine], "groups": len(joined)}

    def tppo_receive_weights(self, key: str, tied: bool) -> dict:
        """Receive every group's buckets (in order) into the live model; returns what arrived.

        ``tied``: the model ties lm_head to the embedding (see ``with_tied_lm_head``).
        """
        from megatron_tppo.rollout.vllm_common import with_tied_lm_head
        from megatron_tppo.weights.memprobe import PeakMemory
        from megatron_tppo.weights.transfer import receive
        from megatron_tppo.weights.transports import TransferStats

        groups = getattr(self, "_tppo_groups", {}).get(key)
        if not groups:
            raise RuntimeError(f"no weight-transfer groups {key!r} joined on this worker")
        stats = TransferStats()
        dev = getattr(self, "device", torch.device("cpu"))

        def stream():
            for g in groups:  # one lazy generator over all groups: one reload, layers as they come
                yield from receive(g, stats, device=dev)

        weights = with_tied_lm_head(stream()) if tied else stream()
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        stats.seconds = time.perf_counter() - t0
        return {**stats.as_dict(), "load_s": stats.seconds - stats.wire_s, "rank": int(self.rank),
                "pid": os.getpid(), **mem.as_dict()}

    def tppo_memory(self, reset: bool = False) -> dict:
        """This worker process's resident set (current, peak since the last ``reset=True``)."""
        from megatron_tppo.weights.memprobe import reset_peak_rss, rss_bytes

        cur, peak = rss_bytes()
        if reset:
            reset_peak_rss()
        return {"rank": int(self.rank), "rss_bytes": cur, "rss_peak_bytes": peak}

    def tppo_close_transfer(self, key: str) -> None:
        for g in getattr(self, "_tppo_groups", {}).pop(key, []):
            g.close()

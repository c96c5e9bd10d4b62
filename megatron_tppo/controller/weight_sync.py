"""Policy weights from the trainer ranks straight into the rollout engines; the driver only orchestrates.

One transfer group per policy pipeline stage (:mod:`megatron_tppo.weights.transfer`): rank 0 is
the stage's TP-rank-0 / DP-rank-0 trainer rank, ranks ``1 + e * tp + r`` are worker ``r`` of engine
``e`` (every worker of every engine). The driver hands out addresses and ranks and starts the calls
on both sides at once; no weight tensor and no object-store copy of one passes through it.

A sync: every engine calls ``receive_weights`` (one ``reload_weights`` fed by a generator over the
stages' buckets, in stage order) while every policy rank calls ``send_weights`` (replica 0 gathers
each stage's TP shards tensor by tensor; each stage's sender packs and broadcasts buckets). The
engines then drop their prefix caches and stamp the version.

Transport (``rollout.weight_transport``): gloo on CPU; on GPU nccl, unless an engine worker shares a
sender's GPU (colocated: NCCL allows one rank per GPU), where ``auto`` takes ipc (the senders'
buffers shared in place, :mod:`megatron_tppo.weights.ipc`) when every engine worker runs on its
senders' node and gloo staged through host memory otherwise; an explicit ``nccl`` there is a
configuration error. An explicit ``ipc`` (also on CPU, through shared memory) with an engine worker
on another node is refused.
"""
from __future__ import annotations

import time
from typing import Optional

import ray

from megatron_tppo.controller.groups import RolloutGroup, TrainerGroup, wait_all
from megatron_tppo.weights.transfer import resolve_transport


class WeightSync:
    """Orchestrates policy -> engine weight syncs over per-stage transfer groups.

    Args:
        policy: the policy :class:`TrainerGroup` (its ``workers``, ``ranks``, ``who`` are used).
        rollout: the :class:`RolloutGroup` (its ``workers``, ``who``).
        cfg: the run's :class:`~megatron_tppo.config.TPPOConfig` (``rollout.weight_transport``,
            ``rollout.weight_sync_bucket_mb``, ``rollout.tensor_parallel``, ``model.params_dtype``).
        timeout_s: how long any rank waits for its peers in the transfer groups.
    Builds and joins the groups in the constructor (every engine and policy rank takes part).
    """

    def __init__(self, policy: TrainerGroup, rollout: RolloutGroup, cfg, timeout_s: float = 600.0):
        self.policy, self.rollout, self.timeout_s = policy, rollout, timeout_s
        self.bucket_bytes = int(cfg.rollout.weight_sync_bucket_mb) << 20
        self.engine_tp = int(cfg.rollout.tensor_parallel)
        self.world_size = 1 + len(rollout.workers) * self.engine_tp
        self.requested = cfg.rollout.weight_transport
        device = policy.ranks[0]["device"]
        opened = self._policy_call("open_weight_transfer", cfg.model.params_dtype, timeout_s)
        self.senders = sorted((o for o in opened if o is not None), key=lambda o: o["pp_rank"])
        stages = {r["pp_rank"] for r in policy.ranks}
        if [s["pp_rank"] for s in self.senders] != sorted(stages):
            raise RuntimeError(f"weight sync: expected one sender per pipeline stage {sorted(stages)}, got {self.senders}")
        self.backend = self._choose_backend(resolve_transport(self.requested, device))
        groups = [dict(backend=self.backend, host=s["host"], port=s["port"], world_size=self.world_size,
                       timeout_s=timeout_s) for s in self.senders]
        refs = [w.join_weight_transfer.remote(self.backend, self.world_size, timeout_s) for w in policy.workers]
        refs += [w.call.remote("join_weight_transfer", groups, 1 + e * self.engine_tp)
                 for e, w in enumerate(rollout.workers)]
        wait_all(refs, f"weight sync: joining {len(groups)} {self.backend} group(s)", who=policy.who + rollout.who,
                 timeout=timeout_s + 60)
        self.closed = False

    def _policy_call(self, method: str, *args) -> list:
        refs = [getattr(w, method).remote(*args) for w in self.policy.workers]
        return wait_all(refs, f"weight sync: policy.{method}", who=self.policy.who, timeout=self.timeout_s)

    def _choose_backend(self, backend: str) -> str:
        """The transport built: :func:`resolve_transport`'s, checked against where the engine workers
        run (GPU UUIDs: NCCL's one rank per GPU; nodes: ipc reaches only the sender's node)."""
        if backend == "gloo":
            return backend
        refs = [w.call.remote("weight_transfer_devices") for w in self.rollout.workers]
        engines = wait_all(refs, "weight sync: engine devices", who=self.rollout.who, timeout=self.timeout_s)
        away = [(s["pp_rank"], s.get("node"), e, d["rank"], d.get("node")) for s in self.senders
                for e, devs in enumerate(engines) for d in devs if d.get("node") != s.get("node")]
        if backend == "ipc":
            if away:
                stage, node, engine, rank, other = away[0]
                raise ValueError(f"rollout.weight_transport=ipc: engine {engine} worker {rank} runs on node {other}, "
                                 f"the pipeline stage {stage} sender on node {node} ({len(away)} such pair(s)); IPC "
                                 f"handles open only on the sender's node. Use auto, gloo or nccl")
            return backend
        shared = [(s["pp_rank"], e, d["rank"]) for s in self.senders for e, devs in enumerate(engines) for d in devs
                  if d["uuid"] is not None and d["uuid"] == s["uuid"]]
        if not shared:
            return backend
        stage, engine, rank = shared[0]
        msg = (f"engine {engine} worker {rank} shares its GPU with the pipeline stage {stage} sender "
               f"({len(shared)} such pair(s)); NCCL allows one rank per GPU")
        if self.requested == "nccl":
            raise ValueError(f"rollout.weight_transport=nccl: {msg}. Use ipc, gloo (host-staged) or auto")
        if not away:
            print(f"[tppo] weight sync over ipc (CUDA IPC, buffers shared in place): {msg}", flush=True)
            return "ipc"
        print(f"[tppo] weight sync over gloo (host-staged): {msg}; ipc would need every engine worker on its "
              f"senders' node ({len(away)} pair(s) are not)", flush=True)
        return "gloo"

    def sync(self, version: int) -> dict:
        """Send the policy's current weights to every engine and stamp them ``version``.

        Returns metrics: perf/weight_sync_s (wall), perf/weight_sync_gb (one model copy, as sent),
        perf/weight_sync_gb_per_s, perf/weight_sync_buckets (all stages), perf/weight_sync_wire_mb
        (what the senders put on the wire: about the model for gloo/nccl, only handles for ipc), perf/weight_gather_s
        (slowest sender's TP gather), perf/weight_send_s (slowest sender inside its collectives,
        waiting included), perf/weight_load_s (slowest engine worker outside the collectives: vLLM's
        layer processing), mem/weight_sync_sender_growth_mb and mem/weight_sync_receiver_growth_mb
        (largest peak growth of a sender's / an engine worker's memory during the sync: resident
        set on CPU, tracked CUDA allocations on GPU; on CPU the resident set also moves with the
        allocator's reuse of freed memory), mem/weight_sync_receiver_buffers_mb (most transfer
        buffers an engine worker held at once: 2-3 buckets, see megatron_tppo.weights.transfer).
        """
        if self.closed:
            raise RuntimeError("WeightSync.sync after close()")
        t0 = time.perf_counter()
        recv = [w.call.remote("receive_weights", int(version)) for w in self.rollout.workers]
        send = [w.send_weights.remote(self.bucket_bytes) for w in self.policy.workers]
        out = wait_all(send + recv, "weight sync", who=self.policy.who + self.rollout.who,
                       timeout=self.timeout_s + 60)
        wall = time.perf_counter() - t0
        sent, got = out[:len(send)], out[len(send):]
        senders = [s for s in sent if s.get("role") == "sender"]
        workers = [w for engine in got for w in engine["workers"]]
        nbytes = sum(s["bytes"] for s in senders)
        return {
            "perf/weight_sync_s": wall,
            "perf/weight_sync_gb": nbytes / 1e9,
            "perf/weight_sync_gb_per_s": nbytes / 1e9 / max(wall, 1e-9),
            "perf/weight_sync_buckets": float(sum(s["buckets"] for s in senders)),
            "perf/weight_sync_wire_mb": sum(s.get("wire_bytes", 0) for s in senders) / 2**20,
            "perf/weight_sync_max_bucket_mb": max(s["max_bucket_bytes"] for s in senders) / 2**20,
            "perf/weight_gather_s": max(s["gather_s"] for s in senders),
            "perf/weight_send_s": max(s["wire_s"] for s in senders),
            "perf/weight_load_s": max(w["load_s"] for w in workers),
            "mem/weight_sync_sender_growth_mb": max(_growth(s) for s in senders) / 2**20,
            "mem/weight_sync_receiver_growth_mb": max(_growth(w) for w in workers) / 2**20,
            "mem/weight_sync_receiver_buffers_mb": max(w["peak_live_bytes"] for w in workers) / 2**20,
        }

    def close(self) -> None:
        """Leave the transfer groups on every engine and policy rank (idempotent, best effort)."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        refs = [w.close_weight_transfer.remote() for w in self.policy.workers]
        refs += [w.call.remote("close_weight_transfer") for w in self.rollout.workers]
        try:
            ray.get(refs, timeout=60)
        except Exception:  # noqa: BLE001 - on the way out; a dead actor has nothing left to close
            pass


    shutdown = close  # the driver stops everything it started with shutdown()


def _growth(stats: dict) -> float:
    return float(stats.get("cuda_growth_bytes", stats["rss_growth_bytes"]))


def describe(metrics: dict, version: Optional[int] = None) -> str:
    """One log line for a sync's metrics."""
    head = f"weight sync v{version}" if version is not None else "weight sync"
    return (f"{head}: {metrics['perf/weight_sync_gb']:.3f} GB in {metrics['perf/weight_sync_s']:.2f} s "
            f"({metrics['perf/weight_sync_gb_per_s']:.2f} GB/s, {metrics['perf/weight_sync_buckets']:.0f} buckets)")

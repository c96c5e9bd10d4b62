"""Policy weights from the trainer ranks straight into the rollout engines; the driver only orchestrates.

The route comes from the one rule (:mod:`megatron_tppo.weight_route`), asked with where the
engine workers really run (their nodes and GPUs, as they report them) on top of the placement:

- ``local``: every policy rank that has an engine worker on its GPU opens a group of two with it
  (transport ipc); every policy rank assembles the whole model and hands it over bucket by bucket
  (:class:`~megatron_tppo.weights.transfer.LocalSender`).
- ``broadcast``: one group per pipeline stage: its sender (rank 0) and every worker of every
  engine (ranks ``1 + e * tp + r``) (:class:`~megatron_tppo.weights.transfer.StageSender`).

A sync (:meth:`WeightSync.sync`): every engine calls ``receive_weights`` (one ``reload_weights``
fed by a generator over its groups' buckets) while every policy rank calls ``send_weights``; the
engines then drop their prefix caches and stamp the version. No weight tensor and no object-store
copy of one passes through the driver. Each group waits at most ``timeout_s`` for any bucket (the
plan's projected sync times its margin); a bucket that does not get through raises on its sender,
naming the receivers that are behind, and the driver's wait ends with that error.
"""
from __future__ import annotations

import time
from typing import Optional

import ray

from megatron_tppo.controller.groups import RolloutGroup, TrainerGroup, wait_all
from megatron_tppo.weight_route import Route, TransportError, WorkerSite, choose


class WeightSync:
    """Builds the route's transfer groups (every engine worker and policy rank joins) and syncs.

    Args:
        policy: the policy :class:`TrainerGroup`; rollout: the :class:`RolloutGroup`.
        cfg: the run's config (``rollout.weight_transport``, ``rollout.weight_sync_bucket_mb``,
            ``rollout.tensor_parallel``, ``model.params_dtype``).
        placement: the run's :class:`~megatron_tppo.planning.layout.Placement` (which policy rank
            and which engine worker share a GPU).
        timeout_s: the longest any rank waits for a peer in a transfer group, per collective.
    """

    def __init__(self, policy: TrainerGroup, rollout: RolloutGroup, cfg, *, placement, timeout_s: float = 600.0):
        self.policy, self.rollout, self.timeout_s = policy, rollout, float(timeout_s)
        self.bucket_bytes = int(cfg.rollout.weight_sync_bucket_mb) << 20
        self.engine_tp = int(cfg.rollout.tensor_parallel)
        self.closed = True
        self.route = self._route(cfg, placement)
        plans = self._open_local(cfg, placement) if self.route.path == "local" else self._open_broadcast(cfg)
        refs = [w.join_weight_transfer.remote(self.route.transport, 1 + len(self._receivers.get(r, {})),
                                              self.timeout_s, self._receivers.get(r, {}))
                for r, w in enumerate(policy.workers)]
        refs += [w.call.remote("join_weight_transfer", plan) for w, plan in zip(rollout.workers, plans)]
        wait_all(refs, f"weight sync: joining {len(self.senders)} {self.route.transport} group(s)",
                 who=policy.who + rollout.who, timeout=self.timeout_s + 60)
        self.closed = False

    # -- the route and its groups ------------------------------------------------------------------

    def _route(self, cfg, placement) -> Route:
        """The rule asked with the workers' real nodes and GPUs: a GPU pairing the placement promised
        and the cluster does not keep is named here, before any group is built."""
        refs = [w.call.remote("weight_transfer_devices") for w in self.rollout.workers]
        self.devices = wait_all(refs, "weight sync: engine devices", who=self.rollout.who, timeout=self.timeout_s)
        where = wait_all([w.transfer_site.remote() for w in self.policy.workers], "weight sync: policy devices",
                         who=self.policy.who, timeout=self.timeout_s)
        lay = cfg.parallel.policy
        stage_senders = [s * lay.tensor_parallel * lay.data_parallel for s in range(lay.pipeline_parallel)]
        gpu_of = {r: a.gpus[0] for r, a in enumerate(placement.policy)}
        planned = {(a.rank, w): g for a in placement.engines for w, g in enumerate(a.gpus)}
        policy_on = {g: r for r, g in gpu_of.items()}

        def same_gpu(rank: int, e: int, d: dict) -> bool:  # CUDA: by UUID; CPU: the placement's logical GPU
            p = where[rank]
            if p.get("node") != d.get("node"):
                return False
            return p["uuid"] == d["uuid"] if p.get("uuid") and d.get("uuid") else gpu_of[rank] == planned[(e, d["rank"])]

        sites = []
        for e, devs in enumerate(self.devices):
            for d in devs:
                rank = policy_on.get(planned[(e, d["rank"])])
                if rank is not None and not same_gpu(rank, e, d):
                    raise RuntimeError(f"weight sync: the placement puts engine {e} worker {d['rank']} on the GPU of "
                                       f"policy rank {rank}, but they run on {d.get('node')}/{d.get('uuid')} and "
                                       f"{where[rank]['node']}/{where[rank]['uuid']}")
                sites.append(WorkerSite(e, d["rank"], rank, all(d.get("node") == where[s]["node"] for s in stage_senders),
                                        any(same_gpu(s, e, d) for s in stage_senders)))
        try:
            route = choose(cfg.rollout.weight_transport, where[0]["device"], cfg.rollout.colocate, sites)
        except TransportError as err:
            raise ValueError(f"rollout.weight_transport={cfg.rollout.weight_transport}: {err}") from None
        print(f"[tppo] weight sync: {route.describe()}", flush=True)
        return route

    def _open_local(self, cfg, placement) -> list[dict]:
        """Every policy rank with an engine worker on its GPU opens a group of two with it."""
        worker_on = {a_gpu: (a.rank, w) for a in placement.engines for w, a_gpu in enumerate(a.gpus)}
        receiver = {a.rank: worker_on.get(a.gpus[0]) for a in placement.policy}
        refs = [w.open_weight_transfer.remote("local", cfg.model.params_dtype, self.timeout_s,
                                              receiver[r] is not None) for r, w in enumerate(self.policy.workers)]
        self.opened = wait_all(refs, "weight sync: policy.open_weight_transfer", who=self.policy.who,
                               timeout=self.timeout_s)
        self.senders = [o for o in self.opened if o is not None]
        plans = [{} for _ in self.rollout.workers]
        for o in self.senders:
            engine, worker = receiver[o["rank"]]
            plans[engine][worker] = [dict(backend="ipc", host=o["host"], port=o["port"], world_size=2,
                                          timeout_s=self.timeout_s, rank=1)]
        self._receivers = {o["rank"]: {1: "engine {} worker {}".format(*receiver[o["rank"]])} for o in self.senders}
        return plans

    def _open_broadcast(self, cfg) -> list[dict]:
        """One group per stage: the stage's sender and every engine worker."""
        refs = [w.open_weight_transfer.remote("broadcast", cfg.model.params_dtype, self.timeout_s)
                for w in self.policy.workers]
        self.opened = wait_all(refs, "weight sync: policy.open_weight_transfer", who=self.policy.who,
                               timeout=self.timeout_s)
        self.senders = sorted((o for o in self.opened if o is not None), key=lambda o: o["pp_rank"])
        world = 1 + len(self.rollout.workers) * self.engine_tp
        names = {1 + e * self.engine_tp + r: f"engine {e} worker {r}"
                 for e in range(len(self.rollout.workers)) for r in range(self.engine_tp)}
        self._receivers = {o["rank"]: names for o in self.senders}
        groups = [dict(backend=self.route.transport, host=s["host"], port=s["port"], world_size=world,
                       timeout_s=self.timeout_s) for s in self.senders]
        return [{r: [dict(g, rank=1 + e * self.engine_tp + r) for g in groups] for r in range(self.engine_tp)}
                for e in range(len(self.rollout.workers))]

    @property
    def backend(self) -> str:
        return self.route.transport

    @property
    def world_size(self) -> int:
        """Ranks of one transfer group (the sender and its receivers)."""
        return 1 + len(next(iter(self._receivers.values())))

    # -- a sync ------------------------------------------------------------------------------------

    def sync(self, version: int) -> dict:
        """Send the policy's current weights to every engine and stamp them ``version``.

        Returns metrics: perf/weight_sync_s (wall), perf/weight_sync_gb (one model copy, as one
        engine worker receives it), perf/weight_sync_gb_per_s, perf/weight_sync_buckets (into one
        worker), perf/weight_sync_wire_mb (what the senders put on their groups' wire: about the
        model per group for gloo/nccl, only handles for ipc), perf/weight_gather_s (slowest
        rank's TP gather), perf/weight_relay_s (local: slowest rank's pipeline-stage broadcasts),
        perf/weight_send_s (slowest sender inside its group's collectives, waiting included),
        perf/weight_load_s (slowest engine worker outside the collectives: vLLM's layer
        processing), mem/weight_sync_sender_growth_mb and mem/weight_sync_receiver_growth_mb
        (largest peak growth of a sender's / an engine worker's memory during the sync: resident
        set on CPU, tracked CUDA allocations on GPU), mem/weight_sync_receiver_buffers_mb (most
        transfer buffers an engine worker held at once: 2-3 buckets).
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
        senders = [s for s in sent if s.get("role") in ("sender", "local")]
        busy = [s for s in sent if s.get("role") != "idle"]
        workers = [w for engine in got for w in engine["workers"]]
        nbytes = max(w["bytes"] for w in workers)
        return {
            "perf/weight_sync_s": wall,
            "perf/weight_sync_gb": nbytes / 1e9,
            "perf/weight_sync_gb_per_s": nbytes / 1e9 / max(wall, 1e-9),
            "perf/weight_sync_buckets": float(max(w["buckets"] for w in workers)),
            "perf/weight_sync_wire_mb": sum(s.get("wire_bytes", 0) for s in senders) / 2**20,
            "perf/weight_sync_max_bucket_mb": max(s["max_bucket_bytes"] for s in senders) / 2**20,
            "perf/weight_gather_s": max(s["gather_s"] for s in busy),
            "perf/weight_relay_s": max(s.get("relay_s", 0.0) for s in busy),
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

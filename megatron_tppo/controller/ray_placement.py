"""Apply a :class:`megatron_tppo.planning.layout.Placement` on a Ray cluster, exactly as planned.

One placement group per plan node (``STRICT_PACK``: all its bundles on one Ray node), one bundle per
GPU the plan uses there (``{"GPU": 1, "CPU": 1}``). Each actor is scheduled into the bundle of its
first GPU with the GPU fraction the plan gives it; an engine also learns the device ids of all its
bundles (probed once when the groups are ready, before any actor takes a share) for
``CUDA_VISIBLE_DEVICES``.

A Ray cluster without GPUs (the CPU laptop default) gets the same plan on one virtual node with
as many slots as the plan uses; its bundles hold a sliver of CPU instead of a GPU, so actors that
the plan colocates still share a bundle. Logical GPUs (``ray start --num-gpus N`` or
``parallel.local_gpus``) make the GPU path run on CPU machines (PLATFORM.md).
"""
from __future__ import annotations

from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_tppo.config import TPPOConfig
from megatron_tppo.planning.layout import ActorPlacement, Gpu, Placement, PlacementError, cluster_shape, plan_placement


def ray_cluster_gpus() -> list[float]:
    """GPUs of every alive Ray node (logical GPUs count)."""
    return [float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def plan_for_cluster(cfg: TPPOConfig, device: str) -> tuple[Placement, bool]:
    """The run's placement on the connected Ray cluster: (plan, whether bundles hold GPUs)."""
    shape = cluster_shape(ray_cluster_gpus())
    if shape is None:
        if device == "cuda":
            raise PlacementError("parallel.device=cuda but the Ray cluster has no GPU resources")
        r, par = cfg.rollout, cfg.parallel
        p, c = par.policy.world_size, par.critic.world_size
        slots = max(p + c, r.num_engines * r.tensor_parallel) if r.colocate else p + c + r.num_engines * r.tensor_parallel
        # one virtual node as wide as needed, TP groups aligned
        width = -(-slots // max(r.tensor_parallel, 1)) * max(r.tensor_parallel, 1)
        return plan_placement(cfg, 1, width), False
    return plan_placement(cfg, *shape), True


class PlacedCluster:
    """The plan's placement groups, created and ready."""

    def __init__(self, plan: Placement, gpu: bool, timeout_s: float = 600.0):
        self.plan, self.gpu = plan, gpu
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 0.01}
        self.groups = {node: placement_group([dict(bundle) for _ in ix], strategy="STRICT_PACK" if gpu else "PACK",
                                             name=f"tppo-node{node}")
                       for node, ix in plan.node_gpus().items()}
        pending = {node: pg.ready() for node, pg in self.groups.items()}
        done, not_ready = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
        if not_ready:
            late = [n for n, ref in pending.items() if ref in not_ready]
            self.shutdown()
            raise PlacementError(f"placement groups of node(s) {late} not ready within {timeout_s:.0f} s: the plan "
                                 f"asks for {plan.gpus_requested} GPUs ({len(plan.node_gpus())} node(s) x "
                                 f"{plan.gpus_per_node}); ray status shows what the cluster has")
        ray.get(done)
        self._device_ids: dict[Gpu, str] = {}
        self._probe_device_ids(plan.used_gpus)  # before any actor takes its share of a bundle

    def strategy(self, actor: ActorPlacement) -> PlacementGroupSchedulingStrategy:
        node, index = self.plan.bundle_of(actor.gpus[0])
        return PlacementGroupSchedulingStrategy(self.groups[node], placement_group_bundle_index=index,
                                                placement_group_capture_child_tasks=False)

    def actor_options(self, actor: ActorPlacement) -> dict:
        """Ray options that put ``actor`` where the plan says, with the share it declares."""
        frac = actor.gpu_fraction
        return dict(num_gpus=frac if self.gpu else 0, num_cpus=frac if self.gpu else 0,
                    scheduling_strategy=self.strategy(actor))

    def _probe_device_ids(self, gpus: list[Gpu]) -> None:
        """Learn the device id behind each bundle."""
        if not self.gpu:
            return
        todo = [g for g in gpus if g not in self._device_ids]
        probe = ray.remote(num_gpus=0.01, num_cpus=0)(_visible_gpu)
        refs = []
        for g in todo:
            node, index = self.plan.bundle_of(g)
            refs.append(probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.groups[node], placement_group_bundle_index=index)).remote())
        for g, ids in zip(todo, ray.get(refs)):
            self._device_ids[g] = ids

    def visible_devices(self, actor: ActorPlacement) -> Optional[str]:
        """``CUDA_VISIBLE_DEVICES`` for an actor with all of its GPUs (None without GPUs)."""
        if not self.gpu:
            return None
        return ",".join(self._device_ids[g] for g in actor.gpus)

    def shutdown(self) -> None:
        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def _visible_gpu() -> str:
    ids = ray.get_gpu_ids()
    if len(ids) != 1:
        raise RuntimeError(f"a one-GPU bundle showed GPU ids {ids}")
    return str(ids[0])

"""Placement: the GPUs every actor of a run gets, as one pure plan (no ray, torch or vLLM import).

:func:`plan_placement` maps (config, nodes, GPUs per node) to the exact bundles of every actor:
each policy and critic rank, and each vLLM engine with all of its tensor-parallel workers. The
planner CLI prints it (``python -m megatron_tppo.plan ... --json``) and
:mod:`megatron_tppo.controller.groups` applies exactly this plan and nothing else:

- one placement group per node, ``STRICT_PACK``, one ``{"GPU": 1, "CPU": 1}`` bundle per GPU the
  plan uses on that node (so a group's bundles never straddle nodes, and no bundle holds more than
  one GPU: vLLM's Ray utilities refuse such bundles, and a TP engine wants one GPU per worker);
- a trainer rank sits in the bundle of its GPU; an engine with TP = k owns k bundles of one node
  and its actor sits in the first, with ``CUDA_VISIBLE_DEVICES`` set to all k (its k workers are
  vLLM's own processes, started by vLLM's multiprocess executor inside the actor).

Global GPU ``g`` is GPU ``g % gpus_per_node`` of node ``g // gpus_per_node``. Trainer rank ``r`` of
a model whose first GPU is ``o`` gets GPU ``o + r``: megatron-core orders ranks TP fastest, so a
TP group is a run of consecutive GPUs and stays inside a node when the group is aligned.

- **Colocated** (``rollout.colocate``, the 32B default): the policy takes GPUs ``0..P-1``, the critic
  the next ``C``, and the engines are laid over the same ``P + C`` GPUs from GPU 0 (``E x k`` of
  them); each GPU then holds one trainer rank and at most one engine worker, which take turns
  (engines sleep while the trainers train; the trainers offload while the engines generate). GPUs
  requested: ``P + C`` (engines may use fewer).
- **Shared** (``parallel.trainers=shared``, colocated): the policy and the critic both start at
  GPU 0 and take turns on the same GPUs, and the engines are laid over them from GPU 0; a GPU
  then holds a policy rank, a critic rank and an engine worker, so every engine worker receives
  the weights from the policy rank on its own GPU (:mod:`megatron_tppo.weight_route`).
- **Not colocated**: policy, critic and engines own disjoint GPUs, in that order:
  ``P + C + E x k`` GPUs.

``gpu_fraction`` is what each actor declares of its bundle's GPU to Ray: the actors that share
a bundle split it evenly (colocated trainer rank and engine: 0.5 each; shared: a third each), so
Ray's accounting matches the plan and never lets another actor in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_tppo.config import ConfigError, LayoutConfig, TPPOConfig
from megatron_tppo.weight_route import Route, TransportError, WorkerSite, choose


class PlacementError(ConfigError):
    """A layout that cannot be placed on the cluster; the message names the config fields."""


@dataclass(frozen=True)
class Gpu:
    """One GPU: node index and GPU index within the node."""

    node: int
    index: int


@dataclass(frozen=True)
class ActorPlacement:
    """Where one actor runs."""

    group: str
    """"policy", "critic" or "rollout"."""
    rank: int
    """Trainer rank (TP fastest, then DP, then PP) or engine index."""
    gpus: tuple[Gpu, ...]
    """Its GPUs: one for a trainer rank; ``rollout.tensor_parallel`` for an engine (one node)."""
    gpu_fraction: float
    """Share of its first GPU's bundle the actor declares to Ray."""


@dataclass(frozen=True)
class Placement:
    """The whole run's placement; see the module docstring."""

    nodes: int
    gpus_per_node: int
    colocate: bool
    policy: tuple[ActorPlacement, ...]
    critic: tuple[ActorPlacement, ...]
    engines: tuple[ActorPlacement, ...]

    @property
    def gpus_available(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def used_gpus(self) -> list[Gpu]:
        """Every GPU some actor uses, in global order."""
        seen = {g for a in self.policy + self.critic + self.engines for g in a.gpus}
        return sorted(seen, key=lambda g: (g.node, g.index))

    @property
    def gpus_requested(self) -> int:
        return len(self.used_gpus)

    def node_gpus(self) -> dict[int, list[int]]:
        """node -> its used GPU indices (the bundles of that node's placement group, in order)."""
        out: dict[int, list[int]] = {}
        for g in self.used_gpus:
            out.setdefault(g.node, []).append(g.index)
        return out

    def bundle_of(self, gpu: Gpu) -> tuple[int, int]:
        """(node, bundle index within that node's placement group) of a used GPU."""
        return gpu.node, self.node_gpus()[gpu.node].index(gpu.index)

    def to_json(self) -> dict:
        def actors(items):
            return [{"rank": a.rank, "gpu_fraction": a.gpu_fraction,
                     "bundles": [{"node": g.node, "gpu": g.index, "bundle": self.bundle_of(g)[1]} for g in a.gpus]}
                    for a in items]

        return {"gpus_requested": self.gpus_requested, "gpus_available": self.gpus_available,
                "nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "colocate": self.colocate,
                "node_bundles": {str(n): len(v) for n, v in self.node_gpus().items()},
                "groups": {"policy": actors(self.policy), "critic": actors(self.critic),
                           "rollout": actors(self.engines)}}

    def describe(self) -> list[str]:
        """Human-readable lines: which GPUs each group takes."""
        def span(items):
            gs = sorted({g for a in items for g in a.gpus}, key=lambda g: (g.node, g.index))
            by_node: dict[int, list[int]] = {}
            for g in gs:
                by_node.setdefault(g.node, []).append(g.index)
            return ", ".join(f"node {n} GPUs {_ranges(ix)}" for n, ix in by_node.items())

        k = len(self.engines[0].gpus) if self.engines else 0
        return [f"placement: {self.gpus_requested} of {self.gpus_available} GPUs requested "
                f"({'colocated' if self.colocate else 'disjoint'}), one bundle per GPU, one placement group per node",
                f"  policy : {len(self.policy)} ranks on {span(self.policy)}",
                f"  critic : {len(self.critic)} ranks on {span(self.critic)}",
                f"  engines: {len(self.engines)} x TP{k} on {span(self.engines)}"]


def _ranges(ix: list[int]) -> str:
    out, start = [], ix[0]
    for a, b in zip(ix, ix[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def _gpu(g: int, per_node: int) -> Gpu:
    return Gpu(g // per_node, g % per_node)


def _straddles(first: int, size: int, groups: int, per_node: int) -> bool:
    """Whether any of ``groups`` runs of ``size`` consecutive GPUs from ``first`` crosses a node."""
    return any((first + i * size) // per_node != (first + i * size + size - 1) // per_node for i in range(groups))


def _trainer(role: str, lay: LayoutConfig, first: int, per_node: int, fraction: float,
             errors: list[str]) -> tuple[ActorPlacement, ...]:
    t = lay.tensor_parallel
    if t > per_node:
        errors.append(f"parallel.{role}.tensor_parallel={t} spans nodes ({per_node} GPUs per node)")
    elif _straddles(first, t, lay.world_size // t, per_node):
        errors.append(f"parallel.{role}.tensor_parallel={t}: its TP groups would straddle nodes "
                      f"(the {role} starts at GPU {first}, {per_node} GPUs per node)")
    return tuple(ActorPlacement(role, r, (_gpu(first + r, per_node),), fraction) for r in range(lay.world_size))


def sites_of(placement: "Placement", lay: LayoutConfig) -> list[WorkerSite]:
    """Every engine worker's site for :func:`megatron_tppo.weight_route.choose`: the policy rank on
    its GPU, and whether it is on every stage sender's node and GPU (a stage's sender is its
    TP-rank-0 / DP-rank-0 rank: rank ``pp * tp * dp``, TP fastest, then DP, then PP)."""
    per_stage = lay.tensor_parallel * lay.data_parallel
    senders = [placement.policy[s * per_stage].gpus[0] for s in range(lay.pipeline_parallel)]
    policy_on = {a.gpus[0]: a.rank for a in placement.policy}
    return [WorkerSite(engine.rank, w, policy_on.get(g), all(g.node == s.node for s in senders), g in senders)
            for engine in placement.engines for w, g in enumerate(engine.gpus)]


def route_of(cfg: TPPOConfig, placement: "Placement") -> Route:
    """How a sync moves the weights in this placement (the rule of :mod:`megatron_tppo.weight_route`)."""
    return choose(cfg.rollout.weight_transport, cfg.parallel.device, cfg.rollout.colocate,
                  sites_of(placement, cfg.parallel.policy))


def plan_placement(cfg: TPPOConfig, nodes: int, gpus_per_node: int) -> Placement:
    """The placement of ``cfg`` on ``nodes x gpus_per_node`` GPUs; PlacementError naming the reason."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlacementError(f"a cluster needs >= 1 node and >= 1 GPU per node, got {nodes} x {gpus_per_node}")
    par, r = cfg.parallel, cfg.rollout
    p, c, k, e = par.policy.world_size, par.critic.world_size, r.tensor_parallel, r.num_engines
    shared = par.trainers == "shared"
    errors: list[str] = []
    policy = _trainer("policy", par.policy, 0, gpus_per_node, 1.0, errors)
    critic = _trainer("critic", par.critic, 0 if shared else p, gpus_per_node, 1.0, errors)
    trainer_gpus = max(p, c) if shared else p + c
    first_engine_gpu = 0 if r.colocate else trainer_gpus
    if k > gpus_per_node:
        errors.append(f"rollout.tensor_parallel={k} spans nodes ({gpus_per_node} GPUs per node)")
    elif _straddles(first_engine_gpu, k, e, gpus_per_node):
        errors.append(f"rollout.tensor_parallel={k}: engines would straddle nodes "
                      f"({gpus_per_node} GPUs per node, first engine GPU {first_engine_gpu})")
    engines = tuple(
        ActorPlacement("rollout", i, tuple(_gpu(first_engine_gpu + i * k + j, gpus_per_node) for j in range(k)), 1.0)
        for i in range(e))
    trainers = (f"policy {p} and critic {c} on the same GPUs" if shared else f"policy {p} + critic {c}")
    if r.colocate and e * k > trainer_gpus:
        errors.append(f"rollout.colocate: {e} engines x rollout.tensor_parallel={k} = {e * k} GPUs, but the "
                      f"trainers hold only {trainer_gpus} ({trainers}) to share")
    needed = trainer_gpus if r.colocate else trainer_gpus + e * k
    total = nodes * gpus_per_node
    if needed > total:
        errors.append(f"needs {needed} GPUs ({trainers}" + ("" if r.colocate else f" + vLLM {e}x{k}")
                      + f"{', colocated' if r.colocate else ''}), the cluster has {nodes} x {gpus_per_node} = {total}")
    if not errors:  # each actor declares an even share of its first GPU among the actors there
        policy, critic, engines = _shares(policy, critic, engines)
    if errors:
        raise PlacementError("placement impossible:\n  " + "\n  ".join(errors))
    placement = Placement(nodes, gpus_per_node, r.colocate, policy, critic, engines)
    try:
        route_of(cfg, placement)
    except TransportError as err:
        raise PlacementError(f"placement impossible:\n  rollout.weight_transport={r.weight_transport}: {err}") from None
    return placement


def _shares(*groups: tuple[ActorPlacement, ...]) -> tuple[tuple[ActorPlacement, ...], ...]:
    count: dict[Gpu, int] = {}
    for group in groups:
        for a in group:
            for g in a.gpus:
                count[g] = count.get(g, 0) + 1
    return tuple(tuple(ActorPlacement(a.group, a.rank, a.gpus, 1.0 / count[a.gpus[0]]) for a in group)
                 for group in groups)


def cluster_shape(gpus_by_node: list[float]) -> Optional[tuple[int, int]]:
    """(nodes, GPUs per node) of a cluster from each node's GPU count; None when it has no GPU.

    Nodes without GPUs (e.g. a CPU-only head) are left out; the GPU nodes must be alike.
    """
    counts = [int(round(x)) for x in gpus_by_node if x >= 1]
    if not counts:
        return None
    if len(set(counts)) > 1:
        raise PlacementError(f"the Ray cluster's GPU nodes differ in GPU count ({sorted(counts)}); "
                             "the placement needs nodes with equal GPUs")
    return len(counts), counts[0]

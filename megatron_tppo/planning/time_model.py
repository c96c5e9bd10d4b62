"""Seconds: a step's roofline, the start-up, and the waits sized from them (pure arithmetic).

Step (roofline, documented assumptions):
- Generated tokens: every slot fills its window (upper bound): ``num_slots x W``.
- Average context of a slot: ``prompt + W (m+1)/2`` (capped at prompt + L_max), m =
  ceil(L_max/W) windows: a slot is equally likely in any of its windows.
- Training FLOPs per context token: ``6N`` + attention ``6 x 2 x layers x h x ctx/2`` (causal);
  the policy trains on every slot's context (only the new window carries loss, but the whole
  sequence is forward/backward); the critic computes values (forward, 2N) for every slot and
  trains on the responses that finish, about ``num_slots/m`` per step at ``prompt + L_max/2``.
  ``parallel.trainers=split``: policy and critic train on disjoint GPUs at the same time, the
  step waits for the slower one; ``shared``: each trains on all the GPUs, one after the other,
  the step pays both. Time = FLOPs / (GPUs x peak x MFU).
- Decode is memory-bound: a decode iteration of one engine reads its weights and the KV cache of
  its B running sequences: ``(weights + B x ctx x kv bytes) / (HBM bandwidth x efficiency)``
  per GPU, B = its slots, or fewer when the KV cache is full; compute (``2N x B`` FLOPs) bounds
  it from below. Engines run in parallel.
- Prefill after a sync (the prefix cache is reset whenever weights load): every slot's context
  before its window, ``prompt + W (m-1)/2`` on average, at ``2N`` + causal attention FLOPs per
  token, compute-bound at half the bf16 peak, per engine over its TP GPUs.
- Weight sync: :func:`sync_estimate`, term by term along the route
  (:func:`megatron_tppo.planning.layout.route_of`) over the links of
  :class:`~megatron_tppo.planning.hardware.Links`.
- Turn swaps (colocated): :func:`swap_estimate`, the bytes the memory schedule moves between host
  and GPU in a step's phase changes, at ``Host.pcie_gb_s`` per GPU.

Start-up (the order of :mod:`.schedule`: engines, then trainers, then the load, then the sync):
- engine start: process and library start ``engine_boot_s``, the weights read from the shared
  filesystem unless the engine starts from dummy weights (a sync overwrites them before step 1:
  always in ``train``), then compilation and CUDA-graph capture ``engine_compile_s``. All
  engines start at once; a node's workers share its filesystem bandwidth.
- trainer build: ``trainer_boot_s`` (imports, process groups), plus CPU initialization of the
  full weights when it is not skipped (a checkpoint always replaces them in ``train``):
  a rank initializes its stage's layers whole before splitting them, at ``cpu_init_params_s``.
- checkpoint load: the node's share of the checkpoint at the filesystem's read bandwidth.
- first sync: the step model's sync.

Waits: no wait of the controller is shorter than its projection times ``WAIT_MARGIN``, nor
shorter than ``WAIT_FLOOR_S`` (process start jitter, a cold filesystem cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from megatron_tppo.planning.hardware import GPU, GiB, Host, Links
from megatron_tppo.planning.layout import Placement, PlacementError, plan_placement, route_of
from megatron_tppo.planning.memory import embedding_params, layer_params, model_params
from megatron_tppo.weight_route import Route

WAIT_MARGIN = 3.0
WAIT_FLOOR_S = 300.0


@dataclass(frozen=True)
class StartupInputs:
    engine_boot_s: float = 60.0
    """Engine actor, vLLM import, worker processes, NCCL init (assumption)."""
    engine_compile_s: float = 120.0
    """torch.compile and CUDA-graph capture of one engine, cold cache (assumption; 0 with
    ``rollout.enforce_eager``)."""
    trainer_boot_s: float = 60.0
    """Trainer actor, megatron and TE import, process groups (assumption)."""
    cpu_init_params_s: float = 5e7
    """Parameters a trainer initializes per second on one CPU thread (assumption; tools/gpu_check.py
    measures one 32B layer)."""


def startup(cfg, nodes: int, host: Host = Host(), inputs: StartupInputs = StartupInputs(),
            dummy_engine_weights: bool = True, skip_trainer_init: bool = True,
            resume: bool = False, sync_s: float = 0.0) -> dict:
    """Projected seconds of each start-up phase and their sum (the phases run one after another)."""
    m, r, par = cfg.model, cfg.rollout, cfg.parallel
    n = model_params(m)
    engines_per_node = math.ceil(r.num_engines / nodes)
    read = 0.0 if dummy_engine_weights else engines_per_node * n * 2.0 / (host.fs_read_gb_s * 1e9)
    compile_s = 0.0 if r.enforce_eager else inputs.engine_compile_s
    engine = inputs.engine_boot_s + read + compile_s
    init = 0.0
    if not skip_trainer_init:  # a rank builds its stage's layers whole, then splits them
        worst = max(m.num_layers // lay.pipeline_parallel * layer_params(m) for lay in (par.policy, par.critic))
        init = worst / inputs.cpu_init_params_s
    build = inputs.trainer_boot_s + init
    wb = 4 if m.params_dtype == "fp32" else 2
    per_param = wb + ((12 if wb != 4 else 8) if resume else 0)
    ckpt = (n + model_params(m, value_head=True)) * per_param
    load = ckpt / nodes / (host.fs_read_gb_s * 1e9)
    return dict(engine_start_s=engine, engine_weights_read_s=read, trainer_build_s=build, trainer_cpu_init_s=init,
                checkpoint_load_s=load, first_sync_s=sync_s, total_s=engine + build + load + sync_s)


def wait_s(projected_s: float, margin: float = WAIT_MARGIN, floor_s: float = WAIT_FLOOR_S) -> float:
    """The limit of a wait whose work is projected to take ``projected_s``."""
    return max(floor_s, margin * projected_s)


@dataclass(frozen=True)
class Waits:
    """How long the controller waits for each start-up phase and for a sync (seconds)."""

    engine_start_s: float
    trainer_build_s: float
    sync_s: float

    def to_json(self) -> dict:
        return dict(engine_start_s=self.engine_start_s, trainer_build_s=self.trainer_build_s, sync_s=self.sync_s)


@dataclass(frozen=True)
class SyncEstimate:
    """A weight sync's projected seconds, term by term (the terms add up: each step waits for the
    one before it, no overlap assumed)."""

    route: Route
    terms: dict[str, float]
    """Term name -> seconds, in the order the bytes travel."""
    how: dict[str, str]
    """Term name -> the bytes and the link it was priced at, in words."""
    bytes: float
    """bf16 bytes of the whole policy (what every engine receives)."""
    buckets: int
    """Buckets of ``rollout.weight_sync_bucket_mb`` the policy travels in (per stage, rounded up)."""

    @property
    def seconds(self) -> float:
        return sum(self.terms.values())

    @property
    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get)

    def to_json(self) -> dict:
        return dict(route=self.route.to_json(), seconds=self.seconds, terms=dict(self.terms), how=dict(self.how),
                    dominant=self.dominant, gb=self.bytes / 1e9, buckets=self.buckets)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _stage_bytes(m, pp: int) -> list[float]:
    per = m.num_layers // pp * layer_params(m)
    last = m.hidden_size + (0 if m.tie_word_embeddings else embedding_params(m))
    return [2.0 * (per + (embedding_params(m) if s == 0 else 0) + (last if s == pp - 1 else 0)) for s in range(pp)]


def _crosses_nodes(placement: Optional[Placement], lay) -> tuple[bool, bool]:
    """(a PP group of the policy spans nodes, a stage sender's transfer group spans nodes);
    without a placement both are assumed (the slower links)."""
    if placement is None:
        return True, True
    per_stage = lay.tensor_parallel * lay.data_parallel
    node = [a.gpus[0].node for a in placement.policy]
    pp_cross = any(len({node[r + s * per_stage] for s in range(lay.pipeline_parallel)}) > 1
                   for r in range(per_stage))
    senders = {node[s * per_stage] for s in range(lay.pipeline_parallel)}
    workers = {g.node for e in placement.engines for g in e.gpus}
    return pp_cross, len(senders | workers) > 1


def sync_estimate(cfg, placement: Optional[Placement], route: Optional[Route] = None, links: Links = Links(),
                  host: Host = Host()) -> SyncEstimate:
    """The projected seconds of one sync of ``cfg``'s policy into every engine worker along
    ``route`` (default: :func:`~megatron_tppo.planning.layout.route_of` of ``placement``), term
    by term. S = the policy's bf16 bytes, s = the largest stage's, TP/PP the policy's, k =
    ``rollout.tensor_parallel``, W = engine workers, b = buckets.

    ``local`` (``parallel.trainers=shared``; every policy rank, all at once):
      tp_allgather   s (TP-1)/TP / NVLink      the rank's stage over its TP group (inside a node)
      pp_broadcast   (S - smallest stage) / NVLink, or / InfiniBand when a PP group spans nodes
      pack           S / HBM copy               every bucket into the bucket buffer
      ipc_handoff    b x the per-bucket cost    a handle to the engine worker on the same GPU
      engine_copy    S / k / HBM copy           the worker's TP shard into its weights
    ``broadcast`` (each stage's sender, the stages at once):
      tp_allgather   s (TP-1)/TP / NVLink       the sender's stage
      gloo: device_to_host s / PCIe; gloo_tree ceil(log2(W+1)) x s / gloo (binomial tree, a
            full bucket per hop, hops in sequence); host_to_device S / PCIe at each worker
      nccl: nccl_broadcast s / (``Links.nccl_broadcast_gb_s``, else InfiniBand across nodes,
            NVLink inside one: NCCL pipelines the broadcast along a ring)
      ipc:  pack s / HBM copy; ipc_handoff b x the per-bucket cost; peer_read W s / k / NVLink
            (every worker reads its shard out of the sender's GPU)
      engine_copy    S / k / HBM copy           (gloo, nccl)
    ``Links.sync_gb_s`` (a measured rate) replaces every term by S / that rate."""
    m, r, lay = cfg.model, cfg.rollout, cfg.parallel.policy
    route = route or route_of(cfg, placement)
    tp, pp, k = lay.tensor_parallel, lay.pipeline_parallel, r.tensor_parallel
    stages = _stage_bytes(m, pp)
    total, big = sum(stages), max(stages)
    bucket = r.weight_sync_bucket_mb * 2 ** 20
    buckets = sum(math.ceil(b / bucket) for b in stages)
    workers = r.num_engines * k
    pp_cross, group_cross = _crosses_nodes(placement, lay)
    nv, hbm, ib = links.nvlink_gb_s * 1e9, links.hbm_copy_gb_s * 1e9, links.ib_gb_s * 1e9
    pcie, handoff = host.pcie_gb_s * 1e9, links.ipc_bucket_ms * 1e-3
    terms: dict[str, float] = {}
    how: dict[str, str] = {}

    def term(name: str, seconds: float, text: str) -> None:
        terms[name], how[name] = seconds, text

    if links.sync_gb_s:
        term("measured", total / (links.sync_gb_s * 1e9), f"{_gb(total)} at the measured {links.sync_gb_s:g} GB/s")
        return SyncEstimate(route, terms, how, total, buckets)
    if tp > 1:
        term("tp_allgather", big * (tp - 1) / tp / nv,
             f"{_gb(big * (tp - 1) / tp)} ({tp - 1}/{tp} of a {_gb(big)} stage) over NVLink at "
             f"{links.nvlink_gb_s:g} GB/s")
    if route.path == "local":
        if pp > 1:
            bw, link = (ib, "InfiniBand") if pp_cross else (nv, "NVLink")
            term("pp_broadcast", (total - min(stages)) / bw,
                 f"{_gb(total - min(stages))} of the other stages over {link} at {bw / 1e9:g} GB/s")
        term("pack", total / hbm, f"{_gb(total)} into the bucket buffer at {links.hbm_copy_gb_s:g} GB/s (HBM copy)")
        term("ipc_handoff", buckets * handoff, f"{buckets} buckets x {links.ipc_bucket_ms:g} ms")
    elif route.transport == "gloo":
        depth = math.ceil(math.log2(workers + 1))
        term("device_to_host", big / pcie, f"{_gb(big)} staged in the sender's host memory at {host.pcie_gb_s:g} GB/s")
        term("gloo_tree", depth * big / (links.gloo_gb_s * 1e9),
             f"{depth} hops (binomial tree to {workers} workers) x {_gb(big)} at {links.gloo_gb_s:g} GB/s")
        term("host_to_device", total / pcie, f"{_gb(total)} into each worker's GPU at {host.pcie_gb_s:g} GB/s")
    elif route.transport == "nccl":
        bw = links.nccl_broadcast_gb_s * 1e9 if links.nccl_broadcast_gb_s else (ib if group_cross else nv)
        term("nccl_broadcast", big / bw, f"{_gb(big)} along NCCL's ring at {bw / 1e9:g} GB/s")
    else:  # ipc from each stage's sender to the workers of its node
        term("pack", big / hbm, f"{_gb(big)} into the bucket buffer at {links.hbm_copy_gb_s:g} GB/s (HBM copy)")
        term("ipc_handoff", buckets * handoff, f"{buckets} buckets x {links.ipc_bucket_ms:g} ms")
        term("peer_read", workers * big / k / nv,
             f"{workers} workers x {_gb(big / k)} out of the sender's GPU over NVLink at {links.nvlink_gb_s:g} GB/s")
        return SyncEstimate(route, terms, how, total, buckets)
    term("engine_copy", total / k / hbm,
         f"{_gb(total / k)} (1/{k} of {_gb(total)}) into the worker's weights at {links.hbm_copy_gb_s:g} GB/s")
    return SyncEstimate(route, terms, how, total, buckets)


def swap_estimate(table, cycle, host: Host = Host()) -> dict:
    """Seconds a step's turn swaps take: at each phase change of ``cycle`` (phase names, the
    schedule's step from generation back to generation), the bytes of trainer weights and
    optimizer state that the memory schedule ``table``
    (:func:`megatron_tppo.planning.schedule.phase_table`) moves between host and GPU, on the GPU
    that moves the most, at ``Host.pcie_gb_s`` (every GPU copies at once). Gradients are dropped
    and zeroed, not copied; engines sleep at level 2 in a step and get their weights from the
    sync: no engine bytes cross PCIe."""
    held: dict[tuple[str, tuple[int, int]], dict[str, float]] = {}
    for gp in table:
        d = held.setdefault((gp.phase, gp.gpu), {})
        for h in gp.holdings:
            if h.item in ("weights", "optimizer") and not h.component.startswith("engine"):
                d[(h.component, h.item)] = d.get((h.component, h.item), 0.0) + h.bytes
    gpus = sorted({gp.gpu for gp in table})
    moves = []
    for a, b in zip(cycle, cycle[1:]):
        worst = 0.0
        for g in gpus:
            before, after = held.get((a, g), {}), held.get((b, g), {})
            worst = max(worst, sum(abs(after.get(key, 0.0) - before.get(key, 0.0)) for key in set(before) | set(after)))
        moves.append({"from": a, "to": b, "gib": worst / GiB, "seconds": worst / (host.pcie_gb_s * 1e9)})
    return dict(seconds=sum(x["seconds"] for x in moves), moves=moves)


def placement_for_waits(cfg, nodes: int) -> Optional[Placement]:
    """The placement of ``cfg`` on ``nodes`` nodes with as many GPUs per node as its layout uses
    (rounded up; else 8, then 16), or None when none places: for a caller that knows the
    transport but not the placement."""
    par, r = cfg.parallel, cfg.rollout
    p, c = par.policy.world_size, par.critic.world_size
    used = (max(p, c) if par.trainers == "shared" else p + c) + (0 if r.colocate else r.num_engines * r.tensor_parallel)
    for per in sorted({max(1, math.ceil(used / max(nodes, 1))), 8, 16}):
        try:
            return plan_placement(cfg, nodes, per)
        except PlacementError:
            continue
    return None


def waits(cfg, nodes: int, route: Union[str, Route], gpu: GPU = GPU(), host: Host = Host(),
          placement: Optional[Placement] = None, links: Links = Links()) -> Waits:
    """The controller's limits for ``cfg`` on ``nodes`` nodes (the projection of :func:`startup`
    with ``train``'s start-up: dummy engine weights, trainer initialization skipped; a resume's
    larger load; the sync of :func:`sync_estimate`). ``route``: the sync's route, or its transport
    alone; without ``placement``, :func:`placement_for_waits`'s."""
    if placement is None:
        placement = placement_for_waits(cfg, nodes)
    if isinstance(route, str):
        given, route = route, None
        if placement is not None:
            try:
                route = route_of(cfg, placement)
            except ValueError:  # a transport the rule refuses there: take the one given
                route = None
        if route is None or route.transport != given:
            route = Route("broadcast", given, "the transport given")
    sync = sync_estimate(cfg, placement, route, links, host).seconds
    s = startup(cfg, nodes, host, resume=True, sync_s=sync)
    return Waits(wait_s(s["engine_start_s"]), wait_s(s["trainer_build_s"] + s["checkpoint_load_s"]), wait_s(sync))


def step_roofline(cfg, gpu: GPU, prompt_tokens: int, kv_capacity_tokens: float, kv_tok: float,
                  vllm_weight_bytes: float, sync_s: float, swap_s: float = 0.0) -> dict:
    """The step's seconds by phase (module docstring) and the unit costs the projection reads;
    ``sync_s`` and ``swap_s`` from :func:`sync_estimate` and :func:`swap_estimate`."""
    m, r, par = cfg.model, cfg.rollout, cfg.parallel
    pol, cri = par.policy, par.critic
    n_policy, n_critic = model_params(m), model_params(m, value_head=True)
    full_len = prompt_tokens + r.max_response_tokens
    slots_per_engine = math.ceil(r.num_slots / r.num_engines)
    m_win = cfg.max_windows
    ctx = min(prompt_tokens + r.window_tokens * (m_win + 1) / 2, full_len)

    def attn(c):  # fwd+bwd, causal
        return 6 * 2 * m.num_layers * m.hidden_size * c / 2

    peak = (gpu.peak_tflops_fp8 if m.fp8 else gpu.peak_tflops_bf16) * 1e12
    pol_flops = r.num_slots * ctx * (6 * n_policy + attn(ctx))
    finished = r.num_slots / m_win
    c_ctx = prompt_tokens + r.max_response_tokens / 2
    cri_flops = finished * c_ctx * (6 * n_critic + attn(c_ctx)) + r.num_slots * ctx * (2 * n_critic + attn(ctx) / 3)
    t_pol = pol_flops / (pol.world_size * peak * gpu.train_mfu)
    t_cri = cri_flops / (cri.world_size * peak * gpu.train_mfu)
    batch = max(min(slots_per_engine, kv_capacity_tokens / ctx), 1.0)
    bw = gpu.hbm_tb_s * 1e12 * gpu.decode_bw_efficiency
    prefill_peak = r.tensor_parallel * gpu.peak_tflops_bf16 * 1e12 * 0.5
    t_iter = max((vllm_weight_bytes + batch * ctx * kv_tok) / bw, 2 * n_policy * batch / prefill_peak)
    t_decode = slots_per_engine * r.window_tokens / batch * t_iter
    prefill_ctx = min(prompt_tokens + r.window_tokens * (m_win - 1) / 2, full_len)
    t_prefill = slots_per_engine * prefill_ctx * (2 * n_policy + attn(prefill_ctx) / 3) / prefill_peak
    shared = par.trainers == "shared"
    t_gen, t_train = t_decode + t_prefill, (t_pol + t_cri if shared else max(t_pol, t_cri))
    return dict(
        ctx=ctx, batch=batch, t_iter=t_iter, gen_decode_s=t_decode, reprefill_s=t_prefill, gen_s=t_gen,
        policy_train_s=t_pol, critic_train_s=t_cri, train_s=t_train, sync_s=sync_s, swap_s=swap_s,
        step_s=t_gen + t_train + sync_s + swap_s, trainers_shared=float(shared),
        policy_pflop=pol_flops / 1e15, critic_pflop=cri_flops / 1e15, peak_tflops=peak / 1e12,
        gen_tokens=float(r.num_slots * r.window_tokens), prefill_ctx=prefill_ctx,
        reprefill_tokens_per_engine=slots_per_engine * prefill_ctx, slots_per_engine=float(slots_per_engine),
        # unit costs for models that count their own tokens (projection.py)
        decode_weights_s=vllm_weight_bytes / bw, decode_kv_s_per_token=kv_tok / bw,
        decode_compute_s_per_seq=2 * n_policy / prefill_peak,
        policy_s_per_flop=1.0 / (pol.world_size * peak * gpu.train_mfu),
        critic_s_per_flop=1.0 / (cri.world_size * peak * gpu.train_mfu),
        prefill_s_per_flop=1.0 / prefill_peak, attn_flops_per_ctx=2.0 * m.num_layers * m.hidden_size)

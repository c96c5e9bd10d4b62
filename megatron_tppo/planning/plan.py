"""The plan of a run: does a config divide, place and fit a cluster, and what does a step cost?

:func:`make_plan` joins the planning package's parts (pure arithmetic: no ray, vllm, megatron or
torch import): the placement of every actor (:mod:`.layout`), the memory schedule of every phase
on every GPU and the host memory of every node (:mod:`.schedule`, :mod:`.memory`), the step's
roofline with the weight sync term by term and the trainers' turn swaps, the start-up and the
waits (:mod:`.time_model`), and the same for the other trainer layout (:func:`compare_layouts`:
``parallel.trainers`` split against shared). It raises :class:`PlanError` naming the reason when
the layout cannot divide or a phase cannot fit. ``python -m megatron_tppo.plan`` is its command
line.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_tppo.config import ConfigError, TPPOConfig
from megatron_tppo.config_io import set_dotted
from megatron_tppo.planning import schedule as S
from megatron_tppo.planning.hardware import GPU, GiB, Host, Links
from megatron_tppo.planning.layout import Placement, PlacementError, plan_placement, route_of, sites_of
from megatron_tppo.planning.memory import (VLLM_OVERHEAD_GIB, checkpoint_bytes, kv_bytes_per_token, model_params,
                                           trainer_memory)
from megatron_tppo.planning.time_model import SyncEstimate, startup, step_roofline, swap_estimate, sync_estimate, waits


class PlanError(ValueError):
    """A layout that cannot divide or cannot fit; the message names the reason."""


@dataclass
class Plan:
    lines: list[str]
    numbers: dict[str, float]
    placement: Optional[Placement] = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    memory: list = dataclasses.field(default_factory=list)
    """:func:`megatron_tppo.planning.schedule.phase_table` of the run."""
    host: dict = dataclasses.field(default_factory=dict)
    """:func:`megatron_tppo.planning.schedule.host_table` of the run."""
    startup: dict = dataclasses.field(default_factory=dict)
    waits: Optional[object] = None
    sync: Optional[SyncEstimate] = None
    """The sync's projection, term by term (:func:`~megatron_tppo.planning.time_model.sync_estimate`)."""
    swaps: dict = dataclasses.field(default_factory=dict)
    """:func:`~megatron_tppo.planning.time_model.swap_estimate` of a step."""
    layouts: dict = dataclasses.field(default_factory=dict)
    """:func:`compare_layouts`: this config's trainer layout and the other one, side by side."""
    sync_layout: Optional[object] = None
    """The policy's layout (``parallel.policy``) the sync reads from."""

    def to_json(self) -> dict:
        peaks = S.peaks(self.memory)
        return dict(self.placement.to_json(), numbers=self.numbers, warnings=self.warnings,
                    memory_peaks={k: dict(node=v.gpu[0], gpu=v.gpu[1], total_gib=v.total / GiB) for k, v in peaks.items()},
                    memory=S.to_json(self.memory),
                    host_memory={str(n): dict(total_gib=sum(h.bytes for h in hold) / GiB,
                                              items=[dict(component=h.component, item=h.item, gib=h.bytes / GiB)
                                                     for h in hold])
                                 for n, hold in sorted(self.host.items())},
                    startup=self.startup, waits=self.waits.to_json() if self.waits else None,
                    sync=dict(self.sync.to_json(), workers=self.workers()) if self.sync else None,
                    swaps=self.swaps, layouts=self.layouts)

    def workers(self) -> list[dict]:
        """Every engine worker: its GPU, the policy rank on it, and the transport it receives by
        (one rule for all: :func:`megatron_tppo.weight_route.choose`)."""
        lay = self.sync_layout
        sites = sites_of(self.placement, lay)
        return [dict(engine=s.engine, worker=s.worker, node=self.placement.engines[s.engine].gpus[s.worker].node,
                     gpu=self.placement.engines[s.engine].gpus[s.worker].index, policy_rank=s.policy_rank,
                     transport=self.sync.route.transport, path=self.sync.route.path) for s in sites]


def fill_layout(cfg: TPPOConfig, total_gpus: int) -> list[str]:
    """Scale the DP sizes and vLLM engine count of ``cfg`` to ``total_gpus``; returns the overrides."""
    pw, cw = cfg.parallel.policy.world_size, cfg.parallel.critic.world_size
    r = cfg.rollout
    shared = cfg.parallel.trainers == "shared"
    trainers = max(pw, cw) if shared else pw + cw
    base = trainers if r.colocate else trainers + r.num_engines * r.tensor_parallel
    if total_gpus % base:
        raise PlanError(f"--fill: {total_gpus} GPUs is not a multiple of the config's layout ({base} GPUs: "
                        + (f"policy {pw} and critic {cw} on the same GPUs" if shared else f"policy {pw} + critic {cw}")
                        + ("" if r.colocate else f" + vLLM {r.num_engines}x{r.tensor_parallel}") + ")")
    k = total_gpus // base
    cfg.parallel.policy.data_parallel *= k
    cfg.parallel.critic.data_parallel *= k
    r.num_engines = (total_gpus // r.tensor_parallel) if r.colocate else r.num_engines * k
    return [f"parallel.policy.data_parallel={cfg.parallel.policy.data_parallel}",
            f"parallel.critic.data_parallel={cfg.parallel.critic.data_parallel}",
            f"rollout.num_engines={r.num_engines}"]


def _gib(x: float) -> str:
    return f"{x / GiB:6.1f} GiB"


def _divides(cfg: TPPOConfig, nodes: int, gpus_per_node: int) -> Placement:
    m, r, par = cfg.model, cfg.rollout, cfg.parallel
    errors: list[str] = []
    for role, lay in (("policy", par.policy), ("critic", par.critic)):
        t = lay.tensor_parallel
        if m.num_attention_heads % t or m.num_query_groups % t:
            errors.append(f"parallel.{role}.tensor_parallel={t} does not divide the {m.num_attention_heads} heads / "
                          f"{m.num_query_groups} KV groups")
        if m.num_layers % lay.pipeline_parallel:
            errors.append(f"parallel.{role}.pipeline_parallel={lay.pipeline_parallel} does not divide "
                          f"model.num_layers={m.num_layers}")
    if m.num_attention_heads % r.tensor_parallel:
        errors.append(f"rollout.tensor_parallel={r.tensor_parallel} does not divide the {m.num_attention_heads} heads")
    placement = None
    try:
        placement = plan_placement(cfg, nodes, gpus_per_node)  # the exact bundles the Ray code applies
    except PlacementError as err:
        errors += str(err).splitlines()[1:]
    if errors:
        raise PlanError("layout does not divide:\n  " + "\n  ".join(e.strip() for e in errors))
    return placement


def transport_of(cfg: TPPOConfig, placement: Placement) -> str:
    """The transport a sync uses in this placement (:func:`~megatron_tppo.planning.layout.route_of`)."""
    return route_of(cfg, placement).transport


def make_plan(cfg: TPPOConfig, nodes: int, gpus_per_node: int, gpu: GPU = GPU(), prompt_tokens: int = 1024,
              host: Host = Host(), links: Links = Links(), compare: bool = True) -> Plan:
    """Check ``cfg`` against ``nodes x gpus_per_node`` GPUs; raise PlanError naming the reason.
    ``compare``: also plan the other trainer layout (:func:`compare_layouts`) and print both."""
    plan, fit_errors = evaluate(cfg, nodes, gpus_per_node, gpu, prompt_tokens, host, links)
    if compare:
        plan.layouts = compare_layouts(cfg, nodes, gpus_per_node, (plan, fit_errors), gpu, prompt_tokens, host, links)
        plan.lines += format_layouts(plan.layouts)
    if fit_errors:
        raise PlanError("layout does not fit in memory:\n  " + "\n  ".join(fit_errors) + "\n" + "\n".join(plan.lines))
    return plan


def step_cycle(cfg: TPPOConfig) -> tuple[str, ...]:
    """A steady step's phases in the memory schedule, from generation back to generation (shared
    trainers take the updates in turns: ``updates@critic``, ``updates@policy``)."""
    return ("generation",) + tuple(S.with_turns(S.STEP, S.shared(cfg)))


def evaluate(cfg: TPPOConfig, nodes: int, gpus_per_node: int, gpu: GPU = GPU(), prompt_tokens: int = 1024,
             host: Host = Host(), links: Links = Links()) -> tuple[Plan, list[str]]:
    """The plan of ``cfg`` and the reasons it does not fit memory (empty when it fits); PlanError
    when the layout does not divide."""
    m, r, par = cfg.model, cfg.rollout, cfg.parallel
    pol, cri = par.policy, par.critic
    total = nodes * gpus_per_node
    placement = _divides(cfg, nodes, gpus_per_node)
    needed = placement.gpus_requested

    # ---- memory: every phase on every GPU, the engines' budget, the hosts
    util_max = S.max_utilization(cfg, placement, gpu)
    util = r.gpu_memory_utilization if r.gpu_memory_utilization is not None else util_max
    table = S.phase_table(cfg, placement, gpu, utilization=util)
    host_tab = S.host_table(cfg, placement, host)
    fit_errors = S.check_fits(table, gpu) + S.check_host(host_tab, host)
    if r.gpu_memory_utilization is not None and r.gpu_memory_utilization > util_max + 1e-9:
        fit_errors.append(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} leaves too little for what "
                          f"stays on the GPU while the engines are awake; at most {util_max:.3f} here "
                          f"(or leave it unset: the schedule's value)")
    pm, cm = trainer_memory(m, pol), trainer_memory(m, cri, value_head=True)
    n_policy, n_critic = model_params(m), model_params(m, value_head=True)
    vllm_w = n_policy * 2.0 / r.tensor_parallel
    vllm_budget = util * gpu.memory_bytes
    kv_bytes = max(vllm_budget - vllm_w - VLLM_OVERHEAD_GIB * GiB, 0.0)
    kv_tok = kv_bytes_per_token(m, r.tensor_parallel)
    kv_capacity_tokens = kv_bytes / kv_tok  # per engine: each of its GPUs holds 1/TP of every token
    full_len = prompt_tokens + r.max_response_tokens
    slots_per_engine = math.ceil(r.num_slots / r.num_engines)
    if kv_capacity_tokens < full_len:
        fit_errors.append(f"vLLM KV cache holds {kv_capacity_tokens:.0f} tokens per engine, less than one sequence "
                          f"of {full_len} (weights {vllm_w / GiB:.1f} GiB of a {vllm_budget / GiB:.1f} GiB budget)")

    lines = [f"cluster: {nodes} node(s) x {gpus_per_node} GPU(s) = {total} GPUs "
             f"({gpu.memory_gib:g} GiB each); model {n_policy / 1e9:.2f}B params "
             f"(critic {n_critic / 1e9:.2f}B), {m.params_dtype}{' + FP8 ' + m.fp8 if m.fp8 else ''}",
             f"policy : TP{pol.tensor_parallel} x PP{pol.pipeline_parallel} x DP{pol.data_parallel} = {pol.world_size} GPUs,"
             f" micro-batch {pol.micro_batch_tokens} tokens, recompute {pol.recompute}",
             f"critic : TP{cri.tensor_parallel} x PP{cri.pipeline_parallel} x DP{cri.data_parallel} = {cri.world_size} GPUs,"
             f" micro-batch {cri.micro_batch_tokens} tokens, recompute {cri.recompute}",
             f"vLLM   : {r.num_engines} engine(s) x TP{r.tensor_parallel} = {r.num_engines * r.tensor_parallel} GPUs, "
             + ("colocated with the trainers" if r.colocate else "on their own GPUs")
             + f"; GPUs used {needed} of {total}",
             *placement.describe(),
             "trainer memory per GPU (worst pipeline stage):"]
    for name, tm in (("policy", pm), ("critic", cm)):
        lines.append(f"  {name}: params {tm.params / 1e9:.2f}B | weights {_gib(tm.weights)} | grads {_gib(tm.grads)} | "
                     f"optimizer {_gib(tm.optimizer)} | activations {_gib(tm.activations)} | logits {_gib(tm.logits)} "
                     f"| train peak {_gib(tm.train_peak)}")
    lines.append(f"  vLLM  : gpu_memory_utilization {util:.3f} ("
                 + ("set" if r.gpu_memory_utilization is not None else "from the schedule")
                 + f"; the schedule allows at most {util_max:.3f}) | weights {_gib(vllm_w)} | KV cache {_gib(kv_bytes)} = "
                 f"{kv_capacity_tokens / 1e3:.0f}K tokens per engine ({kv_capacity_tokens / full_len:.1f} sequences at "
                 f"prompt {prompt_tokens} + L_max {r.max_response_tokens})")
    lines += S.format_peaks(table, gpu)
    node_totals = {n: sum(h.bytes for h in hold) for n, hold in host_tab.items()}
    worst_node = max(node_totals, key=node_totals.get)
    items: dict[str, float] = {}
    for h in host_tab[worst_node]:
        items[h.item] = items.get(h.item, 0.0) + h.bytes
    lines.append(f"host memory at its peak (node {worst_node}): {node_totals[worst_node] / GiB:.0f} GiB of "
                 f"{host.memory_gib:g} GiB (" + ", ".join(f"{k} {v / GiB:.0f}" for k, v in items.items()) + ")")

    # ---- time
    route = route_of(cfg, placement)
    sync = sync_estimate(cfg, placement, route, links, host)
    swaps = swap_estimate(table, step_cycle(cfg), host) if r.colocate else dict(seconds=0.0, moves=[])
    t = step_roofline(cfg, gpu, prompt_tokens, kv_capacity_tokens, kv_tok, vllm_w, sync.seconds, swaps["seconds"])
    total_t = t["step_s"]
    shared = par.trainers == "shared"
    lines += [f"time per step (roofline: MFU {gpu.train_mfu:g}, {t['peak_tflops']:g} TFLOP/s peak, HBM {gpu.hbm_tb_s:g} TB/s"
              f" x {gpu.decode_bw_efficiency:g}; generation upper bound: every slot fills its window):",
              f"  generation: {t['gen_tokens'] / 1e6:.1f}M tokens, {t['batch']:.0f} running sequences per engine (avg "
              f"context {t['ctx']:.0f}), {t['t_iter'] * 1e3:.1f} ms per decode iteration -> {t['gen_decode_s']:.0f} s, "
              f"+ re-prefill after the sync's prefix-cache reset {t['reprefill_tokens_per_engine'] / 1e6:.2f}M tokens "
              f"per engine -> {t['reprefill_s']:.0f} s -> {t['gen_s']:8.0f} s",
              f"  training  : policy {t['policy_pflop']:.0f} PFLOP -> {t['policy_train_s']:.0f} s, critic "
              f"{t['critic_pflop']:.0f} PFLOP -> {t['critic_train_s']:.0f} s "
              + ("(one after the other, each on all its GPUs)" if shared else "(at once, on their own GPUs)")
              + f" -> {t['train_s']:8.0f} s",
              f"  weight sync: {sync.bytes / 1e9:.1f} GB (bf16) in {sync.buckets} buckets, route {route.path}/"
              f"{route.transport} ({route.why}) -> {sync.seconds:8.2f} s; dominant: {sync.dominant} "
              f"({sync.terms[sync.dominant]:.2f} s: {sync.how[sync.dominant]})",
              "    terms: " + ", ".join(f"{k} {v:.3f} s" for k, v in sync.terms.items())
              + " (assumed links, planning/hardware.py Links: --nvlink-gb-s, --hbm-copy-gb-s, --ib-gb-s, ...; or a "
                "measured --sync-gb-s)",
              f"  turn swaps: trainer offloads and onloads of a step over PCIe at {host.pcie_gb_s:g} GB/s per GPU ("
              + (", ".join(f"{x['from']}->{x['to']} {x['gib']:.1f} GiB" for x in swaps["moves"] if x["gib"] > 0)
                 or "none") + f") -> {swaps['seconds']:8.1f} s",
              f"  step      : {total_t:.0f} s ({100 * t['gen_s'] / total_t:.0f}% generation, "
              f"{100 * t['train_s'] / total_t:.0f}% training, {100 * t['sync_s'] / total_t:.2f}% weight sync, "
              f"{100 * t['swap_s'] / total_t:.2f}% turn swaps)"]
    up = startup(cfg, nodes, host, sync_s=t["sync_s"])
    up_resume = startup(cfg, nodes, host, resume=True, sync_s=t["sync_s"])
    w = waits(cfg, nodes, route, gpu, host, placement=placement, links=links)
    lines.append(f"start-up (projected): engines {up['engine_start_s']:.0f} s (dummy weights), trainers "
                 f"{up['trainer_build_s']:.0f} s (no CPU initialization), load {up['checkpoint_load_s']:.0f} s "
                 f"(resume {up_resume['checkpoint_load_s']:.0f} s), first sync {up['first_sync_s']:.1f} s -> "
                 f"{up['total_s']:.0f} s; waits: engine start {w.engine_start_s:.0f} s, trainer build and load "
                 f"{w.trainer_build_s:.0f} s, sync {w.sync_s:.0f} s")
    ck = checkpoint_bytes(m, cfg.checkpoint.keep_last)
    lines.append(f"checkpoint: policy {ck['policy'] / 1e9:.0f} GB + critic {ck['critic'] / 1e9:.0f} GB = "
                 f"{ck['checkpoint'] / 1e12:.2f} TB each ({ck['bytes_per_param']} B/param: weights, fp32 master, "
                 f"2 Adam moments); keep_last={cfg.checkpoint.keep_last} keeps {ck['kept'] / 1e12:.2f} TB, "
                 f"{ck['peak'] / 1e12:.2f} TB on disk while a save is written")
    peaks = S.peaks(table)
    numbers = dict(gpus=total, gpus_used=needed, checkpoint_tb=ck["checkpoint"] / 1e12,
                   checkpoint_disk_peak_tb=ck["peak"] / 1e12, policy_train_peak_gib=pm.train_peak / GiB,
                   critic_train_peak_gib=cm.train_peak / GiB, policy_static_gib=pm.static / GiB,
                   vllm_weights_gib=vllm_w / GiB, kv_cache_gib=kv_bytes / GiB, kv_tokens_per_engine=kv_capacity_tokens,
                   gpu_memory_utilization=util, gpu_memory_utilization_max=util_max,
                   memory_peak_gib=max(gp.total for gp in table) / GiB,
                   generation_peak_gib=peaks["generation"].total / GiB,
                   host_peak_gib=node_totals[worst_node] / GiB, startup_s=up["total_s"],
                   sync_gb=sync.bytes / 1e9, params=float(n_policy), critic_params=float(n_critic),
                   prompt_tokens=float(prompt_tokens),
                   **{k: v for k, v in t.items() if k not in ("ctx", "batch", "t_iter", "prefill_ctx")})
    warnings = []
    if slots_per_engine * t["ctx"] > kv_capacity_tokens:
        warnings.append(f"vLLM KV cache holds {kv_capacity_tokens:.0f} tokens per engine, less than its "
                        f"{slots_per_engine} slots at mean context {t['ctx']:.0f} ({slots_per_engine * t['ctx']:.0f} "
                        f"tokens): vLLM will preempt and recompute long prefixes; raise rollout.num_engines, or lower "
                        f"rollout.num_slots")
    lines += [f"WARNING: {x}" for x in warnings]
    plan = Plan(lines, numbers, placement, warnings, table, host_tab,
                dict(up, resume_load_s=up_resume["checkpoint_load_s"]), w, sync, swaps, sync_layout=par.policy)
    return plan, fit_errors


# ---------------------------------------------------------------------------------------------
# The other trainer layout, side by side
# ---------------------------------------------------------------------------------------------

def _layout_name(lay) -> str:
    return f"TP{lay.tensor_parallel} PP{lay.pipeline_parallel} DP{lay.data_parallel}"


def other_candidates(cfg: TPPOConfig) -> tuple[str, list[tuple[list[str], str]]]:
    """The other ``parallel.trainers`` value and its layouts to try, in order: (overrides, the
    derivation in words). The first that fits memory is the one compared.

    split -> shared (needs ``rollout.colocate``): every trainer GPU G = policy + critic GPUs for
    both; tensor parallelism kept; PP1 first (the sync stays inside each rank's TP group), then the
    config's PP; DP = G / (TP x PP). shared -> split: each on half of G = max(policy, critic
    GPUs); TP kept; the config's PP first, then twice it while it divides the layers; DP =
    G / 2 / (TP x PP). A layout whose DP is not a whole number is skipped."""
    par, m = cfg.parallel, cfg.model
    pol, cri = par.policy, par.critic
    out: list[tuple[list[str], str]] = []
    if par.trainers == "split":
        other, gpus = "shared", pol.world_size + cri.world_size
        pps = [(1, 1)] + ([(pol.pipeline_parallel, cri.pipeline_parallel)] if (pol.pipeline_parallel,
                                                                                cri.pipeline_parallel) != (1, 1) else [])
        how = "TP kept, {pp}, DP = {g} GPUs / (TP x PP)"
    else:
        other, gpus = "split", max(pol.world_size, cri.world_size) // 2
        pps, p, c = [], pol.pipeline_parallel, cri.pipeline_parallel
        while p <= m.num_layers and c <= m.num_layers and not (m.num_layers % p or m.num_layers % c):
            pps.append((p, c))
            p, c = 2 * p, 2 * c
        how = "TP kept, {pp}, each on half the GPUs: DP = {g} GPUs / (TP x PP)"
    for pp_p, pp_c in pps:
        dp_p, dp_c = gpus / (pol.tensor_parallel * pp_p), gpus / (cri.tensor_parallel * pp_c)
        if dp_p < 1 or dp_c < 1 or dp_p % 1 or dp_c % 1:
            continue
        pp = f"PP{pp_p}" if pp_p == pp_c else f"PP{pp_p}/{pp_c}"
        out.append(([f"parallel.trainers={other}", f"parallel.policy.pipeline_parallel={pp_p}",
                     f"parallel.critic.pipeline_parallel={pp_c}", f"parallel.policy.data_parallel={int(dp_p)}",
                     f"parallel.critic.data_parallel={int(dp_c)}"], how.format(pp=pp, g=gpus)))
    return other, out


def _summary(cfg: TPPOConfig, plan: Plan, errors: list[str], derived: str) -> dict:
    n, par = plan.numbers, cfg.parallel
    return dict(trainers=par.trainers, policy=_layout_name(par.policy), critic=_layout_name(par.critic),
                derived=derived, fits=not errors, fit_errors=errors, gen_s=n["gen_s"], train_s=n["train_s"],
                policy_train_s=n["policy_train_s"], critic_train_s=n["critic_train_s"], sync_s=plan.sync.seconds,
                sync_terms=dict(plan.sync.terms), sync_dominant=plan.sync.dominant, route=plan.sync.route.to_json(),
                swap_s=plan.swaps["seconds"], step_s=n["step_s"], memory_peak_gib=n["memory_peak_gib"],
                memory_peaks={k: v.total / GiB for k, v in S.peaks(plan.memory).items()})


def compare_layouts(cfg: TPPOConfig, nodes: int, gpus_per_node: int, own: tuple[Plan, list[str]],
                    gpu: GPU = GPU(), prompt_tokens: int = 1024, host: Host = Host(),
                    links: Links = Links()) -> dict:
    """This config's trainer layout and the other one (:func:`other_candidates`) on the same
    cluster and engines: each one's step (generation, training, sync, turn swaps), whether it fits
    memory, and which has the shorter step (``faster``, whether it fits or not; None when the other
    layout cannot be placed). ``own``: :func:`evaluate` of ``cfg``."""
    mine = cfg.parallel.trainers
    out = {"config": mine, mine: _summary(cfg, *own, "this config")}
    other, candidates = other_candidates(cfg)
    out["other"] = other
    tried: list[str] = []
    best = None
    if other == "shared" and not cfg.rollout.colocate:
        tried.append("shared needs rollout.colocate=true")
    else:
        for overrides, how in candidates:
            c = copy.deepcopy(cfg)
            for item in overrides:
                key, value = item.split("=", 1)
                set_dotted(c, key, value)
            try:
                c.validate()
                plan, errors = evaluate(c, nodes, gpus_per_node, gpu, prompt_tokens, host, links)
            except (PlanError, ConfigError) as err:
                tried.append(f"{_layout_name(c.parallel.policy)}: {str(err).splitlines()[0]}")
                continue
            best = _summary(c, plan, errors, how)
            best["overrides"] = overrides
            if not errors:
                break
            tried.append(f"{best['policy']}: does not fit ({errors[0]})")
    if best is None:
        out[other] = dict(trainers=other, fits=False, error="; ".join(tried) or "no layout divides")
        out["faster"] = None
        return out
    best["tried"] = [t for t in tried if not t.startswith(best["policy"] + ":")]
    out[other] = best
    out["faster"] = min((out[mine], best), key=lambda x: x["step_s"])["trainers"]
    return out


def format_layouts(lay: dict) -> list[str]:
    """The side-by-side lines ``plan`` prints."""
    mine, other = lay["config"], lay["other"]
    a, b = lay[mine], lay[other]
    lines = [f"trainer layouts side by side (parallel.trainers; {mine} is this config's):"]
    if "error" in b:
        return lines + [f"  {other}: not possible here ({b['error']})"]
    w = 38

    def row(name, f):
        return f"  {name:<16}{f(a):<{w}}{f(b)}"

    def fit(x):
        return (f"yes (peak {x['memory_peak_gib']:.1f} GiB)" if x["fits"] else
                f"no: {x['fit_errors'][0].split(':')[0]}" + (f" +{len(x['fit_errors']) - 1}" if len(x["fit_errors"]) > 1
                                                              else ""))

    lines += [row("", lambda x: f"{x['trainers']} ({x['derived']})" if x is a else x["trainers"]),
              row("policy | critic", lambda x: f"{x['policy']} | {x['critic']}"),
              row("fits memory", fit),
              row("generation", lambda x: f"{x['gen_s']:.0f} s"),
              row("training", lambda x: f"{x['train_s']:.0f} s " + ("(one after the other)" if x["trainers"] == "shared"
                                                                    else "(at once)")),
              row("weight sync", lambda x: f"{x['sync_s']:.2f} s ({x['route']['transport']}; {x['sync_dominant']})"),
              row("turn swaps", lambda x: f"{x['swap_s']:.1f} s"),
              row("step", lambda x: f"{x['step_s']:.0f} s"),
              f"  {other}: derived ({b['derived']}): " + " ".join(b.get("overrides", []))]
    lines += [f"  {other}: also tried {t}" for t in b.get("tried", [])]
    fast, slow = (a, b) if lay["faster"] == mine else (b, a)
    unfit = [x["trainers"] for x in (a, b) if not x["fits"]]
    lines.append(f"  -> {fast['trainers']} is faster by {slow['step_s'] - fast['step_s']:.0f} s a step "
                 f"({100 * (1 - fast['step_s'] / slow['step_s']):.1f}%); "
                 + (f"{' and '.join(unfit)} does not fit memory" if unfit else "both fit memory"))
    return lines

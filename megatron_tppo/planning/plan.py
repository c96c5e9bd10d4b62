"""The plan of a run: does a config divide, place and fit a cluster, and what does a step cost?

:func:`make_plan` joins the planning package's parts (pure arithmetic: no ray, vllm, megatron or
torch import): the placement of every actor (:mod:`.layout`), the memory schedule of every phase
on every GPU and the host memory of every node (:mod:`.schedule`, :mod:`.memory`), the step's
roofline, the start-up and the waits (:mod:`.time_model`). It raises :class:`PlanError` naming
the reason when the layout cannot divide or a phase cannot fit. ``python -m megatron_tppo.plan``
is its command line.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_tppo.config import TPPOConfig
from megatron_tppo.planning import schedule as S
from megatron_tppo.planning.hardware import GPU, GiB, Host
from megatron_tppo.planning.layout import Placement, PlacementError, plan_placement, route_of
from megatron_tppo.planning.memory import (VLLM_OVERHEAD_GIB, checkpoint_bytes, kv_bytes_per_token, model_params,
                                           trainer_memory)
from megatron_tppo.planning.time_model import startup, step_roofline, waits


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

    def to_json(self) -> dict:
        peaks = S.peaks(self.memory)
        return dict(self.placement.to_json(), numbers=self.numbers, warnings=self.warnings,
                    memory_peaks={k: dict(node=v.gpu[0], gpu=v.gpu[1], total_gib=v.total / GiB) for k, v in peaks.items()},
                    memory=S.to_json(self.memory),
                    host_memory={str(n): dict(total_gib=sum(h.bytes for h in hold) / GiB,
                                              items=[dict(component=h.component, item=h.item, gib=h.bytes / GiB)
                                                     for h in hold])
                                 for n, hold in sorted(self.host.items())},
                    startup=self.startup, waits=self.waits.to_json() if self.waits else None)


def fill_layout(cfg: TPPOConfig, total_gpus: int) -> list[str]:
    """Scale the DP sizes and vLLM engine count of ``cfg`` to ``total_gpus``; returns the overrides."""
    pw, cw = cfg.parallel.policy.world_size, cfg.parallel.critic.world_size
    r = cfg.rollout
    base = pw + cw if r.colocate else pw + cw + r.num_engines * r.tensor_parallel
    if total_gpus % base:
        raise PlanError(f"--fill: {total_gpus} GPUs is not a multiple of the config's layout ({base} GPUs: "
                        f"policy {pw} + critic {cw}" + ("" if r.colocate else f" + vLLM {r.num_engines}x{r.tensor_parallel}")
                        + ")")
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
              host: Host = Host()) -> Plan:
    """Check ``cfg`` against ``nodes x gpus_per_node`` GPUs; raise PlanError naming the reason."""
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
    transport = transport_of(cfg, placement)
    t = step_roofline(cfg, gpu, prompt_tokens, kv_capacity_tokens, kv_tok, vllm_w, transport)
    total_t = t["step_s"]
    lines += [f"time per step (roofline: MFU {gpu.train_mfu:g}, {t['peak_tflops']:g} TFLOP/s peak, HBM {gpu.hbm_tb_s:g} TB/s"
              f" x {gpu.decode_bw_efficiency:g}; generation upper bound: every slot fills its window):",
              f"  generation: {t['gen_tokens'] / 1e6:.1f}M tokens, {t['batch']:.0f} running sequences per engine (avg "
              f"context {t['ctx']:.0f}), {t['t_iter'] * 1e3:.1f} ms per decode iteration -> {t['gen_decode_s']:.0f} s, "
              f"+ re-prefill after the sync's prefix-cache reset {t['reprefill_tokens_per_engine'] / 1e6:.2f}M tokens "
              f"per engine -> {t['reprefill_s']:.0f} s -> {t['gen_s']:8.0f} s",
              f"  training  : policy {t['policy_pflop']:.0f} PFLOP -> {t['policy_train_s']:.0f} s, critic "
              f"{t['critic_pflop']:.0f} PFLOP -> {t['critic_train_s']:.0f} s (in parallel) -> {t['train_s']:8.0f} s",
              f"  weight sync: {n_policy * 2 / 1e9:.1f} GB (bf16) over {transport}"
              + (" (host-staged: colocated engines share the senders' GPUs)" if transport == "gloo" and r.colocate else "")
              + f" at {(gpu.sync_gloo_gb_s if transport == 'gloo' else gpu.sync_nccl_gb_s):g} GB/s (assumed; "
              f"benchmarks/weight_sync.py measures this machine) -> {t['sync_s']:8.1f} s",
              f"  step      : {total_t:.0f} s ({100 * t['gen_s'] / total_t:.0f}% generation, "
              f"{100 * t['train_s'] / total_t:.0f}% training, {100 * t['sync_s'] / total_t:.1f}% weight sync)"]
    up = startup(cfg, nodes, host, sync_s=t["sync_s"])
    up_resume = startup(cfg, nodes, host, resume=True, sync_s=t["sync_s"])
    w = waits(cfg, nodes, transport, gpu, host)
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
                   sync_gb=n_policy * 2 / 1e9, params=float(n_policy), critic_params=float(n_critic),
                   prompt_tokens=float(prompt_tokens),
                   **{k: v for k, v in t.items() if k not in ("ctx", "batch", "t_iter", "prefill_ctx")})
    warnings = []
    if slots_per_engine * t["ctx"] > kv_capacity_tokens:
        warnings.append(f"vLLM KV cache holds {kv_capacity_tokens:.0f} tokens per engine, less than its "
                        f"{slots_per_engine} slots at mean context {t['ctx']:.0f} ({slots_per_engine * t['ctx']:.0f} "
                        f"tokens): vLLM will preempt and recompute long prefixes; raise rollout.num_engines, or lower "
                        f"rollout.num_slots")
    if fit_errors:
        raise PlanError("layout does not fit in memory:\n  " + "\n  ".join(fit_errors) + "\n" + "\n".join(lines))
    lines += [f"WARNING: {x}" for x in warnings]
    return Plan(lines, numbers, placement, warnings, table, host_tab, dict(up, resume_load_s=up_resume["checkpoint_load_s"]), w)

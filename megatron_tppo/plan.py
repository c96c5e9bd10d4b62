"""Layout and memory planner: does a config fit a cluster, and where does a step's time go?

``python -m megatron_tppo.plan --config FILE --nodes K --gpus-per-node 8 [--fill] [key=value ...]``

Pure arithmetic on the config (no ray, vllm, megatron or torch import). It prints the layout of
every component, a per-GPU memory estimate per phase, and a roofline time split, and exits
non-zero naming the reason when the layout cannot divide or cannot fit. ``--fill`` scales the
data-parallel sizes and the number of vLLM engines to the cluster (the YAML states the smallest
layout; the planner prints the overrides for the bigger one).

Memory model (bytes per GPU; GiB = 2**30 bytes):
- Parameters of the worst pipeline stage: ``layers/PP`` transformer layers split by TP, plus the
  embedding (first stage) and the untied output layer (last stage), each ``V_pad*h/TP``.
  Weights: params x 2 (bf16/fp16) or 4 (fp32). FP8 (Transformer Engine) keeps bf16 weights.
- Gradients: fp32 main grads (the engine sets ``grad_reduce_in_fp32``): params x 4.
- Optimizer (Adam, distributed optimizer): fp32 master copy (only when weights are not fp32)
  + 2 fp32 moments = 12 (or 8) bytes x params / DP.
- Activations per micro-batch of T = ``micro_batch_tokens`` tokens and one layer, bf16, flash
  attention (no s^2 scores), no sequence parallelism (as the engine runs):
  ``2 * (4h + (2h + 2kv + 3F)/TP)`` bytes per token, h = hidden, kv = KV width
  (groups x head dim), F = SwiGLU width: replicated LayerNorm inputs/outputs (4h), and the
  TP-split Q/K/V (h + 2kv), attention output (h), SwiGLU gate+up (2F) and its product (F).
  (Korthikanti et al. 2022, adapted to GQA/SwiGLU/flash attention.) With ``recompute=full``
  only each layer's input (``2h`` bytes per token) is kept, plus one layer's full set during
  its backward. 1F1B keeps PP micro-batches in flight on the first stage, so a stage holds
  ``(layers/PP) x PP`` layers' worth. The loss adds fp32 logits and their gradient on the last
  stage: ``2 x 4 x T x V_pad/TP``.
- vLLM (bf16 weights) per GPU: ``N x 2 / TP_vllm``; KV cache: ``2 (K,V) x layers x kv x 2
  bytes / TP_vllm`` per token; vLLM may use ``gpu_memory_utilization`` of the GPU, less 2 GiB of
  its own activations. Demand for all slots at full length: ``num_slots x (prompt + L_max)``
  tokens; what does not fit runs in waves (vLLM preempts), it does not fail.
- Colocated (``rollout.colocate``): the vLLM engines share the trainers' GPUs. During generation
  the trainers keep only their bf16 weights on the GPU (grads and optimizer states offloaded to
  host, as verl/slime do); during training vLLM sleeps (weights offloaded, KV freed). Not
  colocated: the three components own disjoint GPUs. A fixed 4 GiB per GPU is reserved for the
  CUDA context, NCCL buffers and fragmentation.

Time model (roofline, per step, documented assumptions):
- Generated tokens: every slot fills its window (upper bound): ``num_slots x W``.
- Average context of a slot: ``prompt + W (m+1)/2`` (capped at prompt + L_max), m =
  ceil(L_max/W) windows: a slot is equally likely in any of its windows.
- Training FLOPs per context token: ``6N`` + attention ``6 x 2 x layers x h x ctx/2`` (causal);
  the policy trains on every slot's context (only the new window carries loss, but the whole
  sequence is forward/backward); the critic computes values (forward, 2N) for every slot and
  trains on the responses that finish, about ``num_slots/m`` per step at ``prompt + L_max/2``.
  Policy and critic train on disjoint GPUs at the same time: the step waits for the slower one.
  Time = FLOPs / (GPUs x peak x MFU).
- Decode is memory-bound: a decode iteration of one engine reads its weights and the KV cache of
  its B running sequences: ``(weights + B x ctx x kv bytes) / (HBM bandwidth x efficiency)``
  per GPU, B = its slots, or fewer when the KV cache is full; compute (``2N x B`` FLOPs) bounds
  it from below. Engines run in parallel.
- Prefill after a sync (rollout/vllm_backend.py resets vLLM's prefix cache whenever weights load:
  cached KV was computed with the old weights): every slot's context before its window, prompt +
  earlier windows, ``prompt + W (m-1)/2`` on average, is prefilled again, at ``2N`` + causal
  attention ``2 x 2 x layers x h x c/2`` FLOPs per token, compute-bound at half the bf16 peak,
  per engine over its TP GPUs. It is part of the generation estimate (it includes the first
  window's prompts, which are prefilled anyway). benchmarks/prefix_reset.py measures it on CPU.
- KV fit: an engine's slots at mean context ``slots_per_engine x ctx`` tokens should fit its KV
  cache; when they do not the plan warns: vLLM preempts sequences and recomputes their whole
  prefix when they resume, which this estimate does not count.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_tppo.config import ConfigError, LayoutConfig, ModelConfig, TPPOConfig
from megatron_tppo.config_io import load_config
from megatron_tppo.placement import Placement, PlacementError, ipc_errors, plan_placement

GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    """Accelerator numbers the planner uses (defaults: H100 SXM 80 GB)."""

    memory_gib: float = 79.6
    """Memory as nvidia-smi reports it (81559 MiB)."""
    reserved_gib: float = 4.0
    """CUDA context, NCCL buffers, allocator fragmentation."""
    peak_tflops_bf16: float = 989.0
    """Dense BF16 tensor-core peak."""
    peak_tflops_fp8: float = 1979.0
    """Dense FP8 tensor-core peak."""
    hbm_tb_s: float = 3.35
    """HBM bandwidth."""
    train_mfu: float = 0.40
    """Assumed model-FLOPs utilization of training (forward + backward)."""
    decode_bw_efficiency: float = 0.70
    """Fraction of HBM bandwidth a decode iteration achieves."""
    sync_nccl_gb_s: float = 25.0
    """Weight sync over NCCL (GB/s of bf16 weights into every engine): an assumption between the
    field's anchors for ~30B models (NeMo-RL 0.74-1.0 s over NCCL, about 65 GB/s; verl about
    4.4 s, about 14 GB/s)."""
    sync_gloo_gb_s: float = 2.0
    """Weight sync over gloo, host-staged (colocated engines on GPU: NCCL allows one rank per GPU):
    a TCP broadcast from each stage's sender, bounded by one host's network stack."""

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gib - self.reserved_gib) * GiB


VLLM_OVERHEAD_GIB = 2.0


# --------------------------------------------------------------------------------------------
# Pure counting
# --------------------------------------------------------------------------------------------


def layer_params(m: ModelConfig) -> int:
    """Parameters of one transformer layer (attention + SwiGLU MLP + 2 RMSNorms)."""
    h, kv, f = m.hidden_size, m.num_query_groups * m.head_size, m.ffn_hidden_size
    attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if m.qkv_bias else 0)
    return attn + 3 * h * f + 2 * h


def embedding_params(m: ModelConfig) -> int:
    return m.padded_vocab_size * m.hidden_size


def model_params(m: ModelConfig, value_head: bool = False) -> int:
    """Total parameters N; ``value_head`` replaces the LM output layer by an h->1 head (critic)."""
    out = m.hidden_size if value_head else (0 if m.tie_word_embeddings else embedding_params(m))
    return m.num_layers * layer_params(m) + embedding_params(m) + m.hidden_size + out


def stage_params(m: ModelConfig, lay: LayoutConfig, value_head: bool = False) -> int:
    """Parameters on one GPU of the worst pipeline stage (first or last), split by TP."""
    t, p = lay.tensor_parallel, lay.pipeline_parallel
    layers = (m.num_layers // p) * layer_params(m) // t
    emb = embedding_params(m) // t
    out = (m.hidden_size if value_head else (0 if m.tie_word_embeddings else emb))
    if p == 1:
        return layers + emb + out + m.hidden_size
    return layers + max(emb, out + m.hidden_size)


def weight_bytes_per_param(m: ModelConfig) -> int:
    return 4 if m.params_dtype == "fp32" else 2


def activation_bytes_per_token_layer(m: ModelConfig, tp: int) -> float:
    """Stored activations of one layer per token, no recompute (see the module docstring)."""
    h, kv, f = m.hidden_size, m.num_query_groups * m.head_size, m.ffn_hidden_size
    return 2.0 * (4 * h + (2 * h + 2 * kv + 3 * f) / tp)


def kv_bytes_per_token(m: ModelConfig, tp: int = 1, dtype_bytes: int = 2) -> float:
    """KV-cache bytes of one token on one GPU of a TP-``tp`` engine (KV heads replicate past tp)."""
    heads_per_gpu = max(m.num_query_groups / tp, 1.0)
    return 2.0 * m.num_layers * heads_per_gpu * m.head_size * dtype_bytes


@dataclass
class TrainerMemory:
    """Per-GPU bytes of one trained model (worst pipeline stage)."""

    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def train_peak(self) -> float:
        return self.static + self.activations + self.logits


def trainer_memory(m: ModelConfig, lay: LayoutConfig, value_head: bool = False) -> TrainerMemory:
    params = stage_params(m, lay, value_head)
    wb = weight_bytes_per_param(m)
    optim_per_param = 8 + (4 if wb != 4 else 0)
    t, p, tok = lay.tensor_parallel, lay.pipeline_parallel, lay.micro_batch_tokens
    per_layer = activation_bytes_per_token_layer(m, t) * tok
    layers_held = (m.num_layers // p) * p  # 1F1B: p micro-batches of layers/p layers on stage 0
    if lay.recompute == "full":
        acts = layers_held * 2.0 * m.hidden_size * tok + per_layer
    else:
        acts = layers_held * per_layer
    logits = 0.0 if value_head else 2 * 4.0 * tok * m.padded_vocab_size / t
    return TrainerMemory(params, params * wb, params * 4.0, params * optim_per_param / lay.data_parallel,
                         acts, logits)


def checkpoint_bytes(m: ModelConfig, keep_last: int) -> dict:
    """Disk bytes of one run checkpoint (torch_dist, with optimizer states) and what ``keep_last``
    needs. Per parameter: the weights (params_dtype) + fp32 master copy (none when the weights are
    fp32) + Adam's two fp32 moments, for the policy and the critic (value head). A save writes the
    new checkpoint before it removes the oldest, so the disk peaks at ``keep_last + 1`` of them."""
    wb = weight_bytes_per_param(m)
    per_param = wb + (4 if wb != 4 else 0) + 8
    policy, critic = model_params(m) * per_param, model_params(m, value_head=True) * per_param
    one = float(policy + critic)
    return dict(bytes_per_param=per_param, policy=float(policy), critic=float(critic), checkpoint=one,
                kept=one * keep_last, peak=one * (keep_last + 1))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


class PlanError(ValueError):
    """A layout that cannot divide or cannot fit; the message names the reason."""


@dataclass
class Plan:
    lines: list[str]
    numbers: dict[str, float]
    placement: Optional[Placement] = None
    warnings: list[str] = dataclasses.field(default_factory=list)


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


def make_plan(cfg: TPPOConfig, nodes: int, gpus_per_node: int, gpu: GPU = GPU(),
              prompt_tokens: int = 1024) -> Plan:
    """Check ``cfg`` against ``nodes x gpus_per_node`` GPUs; raise PlanError naming the reason."""
    m, r, par = cfg.model, cfg.rollout, cfg.parallel
    pol, cri = par.policy, par.critic
    errors: list[str] = []
    total = nodes * gpus_per_node

    # ---- divisibility
    for role, lay in (("policy", pol), ("critic", cri)):
        t = lay.tensor_parallel
        if m.num_attention_heads % t or m.num_query_groups % t:
            errors.append(f"parallel.{role}.tensor_parallel={t} does not divide the {m.num_attention_heads} heads / "
                          f"{m.num_query_groups} KV groups")
        if m.num_layers % lay.pipeline_parallel:
            errors.append(f"parallel.{role}.pipeline_parallel={lay.pipeline_parallel} does not divide "
                          f"model.num_layers={m.num_layers}")
    if m.num_attention_heads % r.tensor_parallel:
        errors.append(f"rollout.tensor_parallel={r.tensor_parallel} does not divide the {m.num_attention_heads} heads")
    vllm_gpus = r.num_engines * r.tensor_parallel
    try:
        placement = plan_placement(cfg, nodes, gpus_per_node)  # the exact bundles the Ray code applies
    except PlacementError as err:
        errors += str(err).splitlines()[1:]
        placement = None
    if errors:
        raise PlanError("layout does not divide:\n  " + "\n  ".join(e.strip() for e in errors))
    needed = placement.gpus_requested

    # ---- memory
    usable = gpu.usable_bytes
    pm, cm = trainer_memory(m, pol), trainer_memory(m, cri, value_head=True)
    n_policy, n_critic = model_params(m), model_params(m, value_head=True)
    vllm_w = n_policy * 2.0 / r.tensor_parallel
    vllm_budget = r.gpu_memory_utilization * gpu.memory_gib * GiB
    resident = max(pm.weights, cm.weights) if r.colocate else 0.0
    kv_bytes = max(vllm_budget - vllm_w - VLLM_OVERHEAD_GIB * GiB, 0.0)
    kv_tok = kv_bytes_per_token(m, r.tensor_parallel)
    kv_capacity_tokens = kv_bytes / kv_tok  # per engine: each of its GPUs holds 1/TP of every token
    full_len = prompt_tokens + r.max_response_tokens
    slots_per_engine = math.ceil(r.num_slots / r.num_engines)
    kv_demand = slots_per_engine * full_len * kv_tok
    resident_full = kv_capacity_tokens / full_len

    lines = [f"cluster: {nodes} node(s) x {gpus_per_node} GPU(s) = {total} GPUs "
             f"({gpu.memory_gib:g} GiB each, {gpu.reserved_gib:g} GiB reserved); model {n_policy / 1e9:.2f}B params "
             f"(critic {n_critic / 1e9:.2f}B), {m.params_dtype}{' + FP8 ' + m.fp8 if m.fp8 else ''}",
             f"policy : TP{pol.tensor_parallel} x PP{pol.pipeline_parallel} x DP{pol.data_parallel} = {pol.world_size} GPUs,"
             f" micro-batch {pol.micro_batch_tokens} tokens, recompute {pol.recompute}",
             f"critic : TP{cri.tensor_parallel} x PP{cri.pipeline_parallel} x DP{cri.data_parallel} = {cri.world_size} GPUs,"
             f" micro-batch {cri.micro_batch_tokens} tokens, recompute {cri.recompute}",
             f"vLLM   : {r.num_engines} engine(s) x TP{r.tensor_parallel} = {vllm_gpus} GPUs, "
             + ("colocated with the trainers" if r.colocate else "on their own GPUs")
             + f"; GPUs used {needed} of {total}",
             *placement.describe(),
             "memory per GPU (worst pipeline stage):"]
    for name, tm in (("policy", pm), ("critic", cm)):
        lines.append(f"  {name}: params {tm.params / 1e9:.2f}B | weights {_gib(tm.weights)} | grads {_gib(tm.grads)} | "
                     f"optimizer {_gib(tm.optimizer)} | activations {_gib(tm.activations)} | logits {_gib(tm.logits)} "
                     f"| train peak {_gib(tm.train_peak)}")
    lines.append(f"  vLLM  : weights {_gib(vllm_w)} | KV cache {_gib(kv_bytes)} = {kv_capacity_tokens / 1e3:.0f}K tokens "
                 f"per engine ({resident_full:.1f} sequences at prompt {prompt_tokens} + L_max {r.max_response_tokens}) "
                 f"| its {slots_per_engine} slots at full length would need {_gib(kv_demand)} per GPU")
    gen_peak = resident + vllm_budget
    train_peak = max(pm.train_peak, cm.train_peak)
    lines.append(f"  phase peaks: generation {_gib(gen_peak)}"
                 + (f" (trainer bf16 weights {_gib(resident)} stay)" if r.colocate else "")
                 + f", training {_gib(train_peak)}; usable {_gib(usable)}")

    fit_errors = []
    for name, tm, lay in (("policy", pm, pol), ("critic", cm, cri)):
        if tm.train_peak > usable:
            hint = "; try parallel.%s.recompute=full" % name if lay.recompute == "none" else ""
            fit_errors.append(f"{name} training needs {tm.train_peak / GiB:.1f} GiB per GPU > {usable / GiB:.1f} GiB "
                              f"usable (static {tm.static / GiB:.1f}, activations {tm.activations / GiB:.1f}, "
                              f"logits {tm.logits / GiB:.1f}){hint}")
    if gen_peak > usable + gpu.reserved_gib * GiB * 0.5:
        fit_errors.append(f"generation needs {gen_peak / GiB:.1f} GiB per GPU (rollout.gpu_memory_utilization="
                          f"{r.gpu_memory_utilization} of {gpu.memory_gib:g} GiB"
                          + (f" + trainer weights {resident / GiB:.1f}" if r.colocate else "") + ")")
    if kv_capacity_tokens < full_len:
        fit_errors.append(f"vLLM KV cache holds {kv_capacity_tokens:.0f} tokens per engine, less than one sequence "
                          f"of {full_len} (weights {vllm_w / GiB:.1f} GiB of a {vllm_budget / GiB:.1f} GiB budget)")

    # ---- time (roofline)
    m_win = cfg.max_windows
    ctx = min(prompt_tokens + r.window_tokens * (m_win + 1) / 2, full_len)
    attn = lambda c: 6 * 2 * m.num_layers * m.hidden_size * c / 2  # noqa: E731  (fwd+bwd, causal)
    peak = (gpu.peak_tflops_fp8 if m.fp8 else gpu.peak_tflops_bf16) * 1e12
    pol_flops = r.num_slots * ctx * (6 * n_policy + attn(ctx))
    finished = r.num_slots / m_win
    c_ctx = prompt_tokens + r.max_response_tokens / 2
    cri_flops = finished * c_ctx * (6 * n_critic + attn(c_ctx)) + r.num_slots * ctx * (2 * n_critic + attn(ctx) / 3)
    t_pol = pol_flops / (pol.world_size * peak * gpu.train_mfu)
    t_cri = cri_flops / (cri.world_size * peak * gpu.train_mfu)
    t_train = max(t_pol, t_cri)
    gen_tokens = r.num_slots * r.window_tokens
    batch = max(min(slots_per_engine, kv_capacity_tokens / ctx), 1.0)
    bw = gpu.hbm_tb_s * 1e12 * gpu.decode_bw_efficiency
    step_mem = (vllm_w + batch * ctx * kv_tok) / bw
    step_compute = 2 * n_policy * batch / (r.tensor_parallel * gpu.peak_tflops_bf16 * 1e12 * 0.5)
    t_iter = max(step_mem, step_compute)
    t_decode = slots_per_engine * r.window_tokens / batch * t_iter
    # re-prefill after the sync's prefix-cache reset: each slot's prompt + earlier windows
    prefill_ctx = min(prompt_tokens + r.window_tokens * (m_win - 1) / 2, full_len)
    prefill_flops = slots_per_engine * prefill_ctx * (2 * n_policy + attn(prefill_ctx) / 3)
    t_prefill = prefill_flops / (r.tensor_parallel * gpu.peak_tflops_bf16 * 1e12 * 0.5)
    t_gen = t_decode + t_prefill
    warnings = []
    if slots_per_engine * ctx > kv_capacity_tokens:
        warnings.append(f"vLLM KV cache holds {kv_capacity_tokens:.0f} tokens per engine, less than its "
                        f"{slots_per_engine} slots at mean context {ctx:.0f} ({slots_per_engine * ctx:.0f} tokens): "
                        f"vLLM will preempt and recompute long prefixes; raise rollout.gpu_memory_utilization or "
                        f"rollout.num_engines, or lower rollout.num_slots")
    # weight sync (megatron_tppo.controller.weight_sync): each engine worker receives the whole
    # model, stage after stage, from the stages' senders; one bf16 copy per sync
    sync_bytes = n_policy * 2.0
    # auto as WeightSync resolves it: colocated engines take ipc when all sit on their senders' node
    one_node = not ipc_errors(par.policy, placement.policy, placement.engines)
    transport = r.weight_transport if r.weight_transport != "auto" else (
        "gloo" if par.device == "cpu" else ("ipc" if one_node else "gloo") if r.colocate else "nccl")
    # ipc: a device-local copy at least as fast as NCCL; the NCCL figure is kept as its bound
    sync_bw = (gpu.sync_gloo_gb_s if transport == "gloo" else gpu.sync_nccl_gb_s) * 1e9
    t_sync = sync_bytes / sync_bw
    total_t = t_gen + t_train + t_sync
    lines += [f"time per step (roofline: MFU {gpu.train_mfu:g}, {peak / 1e12:g} TFLOP/s peak, HBM {gpu.hbm_tb_s:g} TB/s"
              f" x {gpu.decode_bw_efficiency:g}; generation upper bound: every slot fills its window):",
              f"  generation: {gen_tokens / 1e6:.1f}M tokens, {batch:.0f} running sequences per engine (avg context "
              f"{ctx:.0f}), {t_iter * 1e3:.1f} ms per decode iteration -> {t_decode:.0f} s, + re-prefill after the "
              f"sync's prefix-cache reset {slots_per_engine * prefill_ctx / 1e6:.2f}M tokens per engine -> "
              f"{t_prefill:.0f} s -> {t_gen:8.0f} s",
              f"  training  : policy {pol_flops / 1e15:.0f} PFLOP -> {t_pol:.0f} s, critic {cri_flops / 1e15:.0f} PFLOP -> "
              f"{t_cri:.0f} s (in parallel) -> {t_train:8.0f} s",
              f"  weight sync: {sync_bytes / 1e9:.1f} GB (bf16) over {transport}"
              + (" (host-staged: colocated engines share the senders' GPUs)" if transport == "gloo" and r.colocate else "")
              + f" at {sync_bw / 1e9:g} GB/s (assumed; benchmarks/weight_sync.py measures this machine) -> "
              f"{t_sync:8.1f} s",
              f"  step      : {total_t:.0f} s ({100 * t_gen / total_t:.0f}% generation, {100 * t_train / total_t:.0f}% "
              f"training, {100 * t_sync / total_t:.1f}% weight sync)"]
    ck = checkpoint_bytes(m, cfg.checkpoint.keep_last)
    lines.append(f"checkpoint: policy {ck['policy'] / 1e9:.0f} GB + critic {ck['critic'] / 1e9:.0f} GB = "
                 f"{ck['checkpoint'] / 1e12:.2f} TB each ({ck['bytes_per_param']} B/param: weights, fp32 master, "
                 f"2 Adam moments); keep_last={cfg.checkpoint.keep_last} keeps {ck['kept'] / 1e12:.2f} TB, "
                 f"{ck['peak'] / 1e12:.2f} TB on disk while a save is written")
    numbers = dict(gpus=total, gpus_used=needed, checkpoint_tb=ck["checkpoint"] / 1e12,
                   checkpoint_disk_peak_tb=ck["peak"] / 1e12, policy_train_peak_gib=pm.train_peak / GiB,
                   critic_train_peak_gib=cm.train_peak / GiB, policy_static_gib=pm.static / GiB,
                   vllm_weights_gib=vllm_w / GiB, kv_cache_gib=kv_bytes / GiB, kv_tokens_per_engine=kv_capacity_tokens,
                   generation_peak_gib=gen_peak / GiB, gen_s=t_gen, train_s=t_train, sync_s=t_sync,
                   gen_decode_s=t_decode, reprefill_s=t_prefill,
                   reprefill_tokens_per_engine=slots_per_engine * prefill_ctx,
                   sync_gb=sync_bytes / 1e9, step_s=total_t,
                   params=float(n_policy), critic_params=float(n_critic), prompt_tokens=float(prompt_tokens),
                   slots_per_engine=float(slots_per_engine),
                   # a decode iteration: max(weights + running x context x kv, running x compute) seconds
                   decode_weights_s=vllm_w / bw, decode_kv_s_per_token=kv_tok / bw,
                   decode_compute_s_per_seq=2 * n_policy / (r.tensor_parallel * gpu.peak_tflops_bf16 * 1e12 * 0.5),
                   # seconds per FLOP of each phase, and causal attention's FLOPs per token per context
                   # token (x3 for training), for models that count their own tokens (projection.py)
                   policy_s_per_flop=1.0 / (pol.world_size * peak * gpu.train_mfu),
                   critic_s_per_flop=1.0 / (cri.world_size * peak * gpu.train_mfu),
                   prefill_s_per_flop=1.0 / (r.tensor_parallel * gpu.peak_tflops_bf16 * 1e12 * 0.5),
                   attn_flops_per_ctx=2.0 * m.num_layers * m.hidden_size)
    if fit_errors:
        raise PlanError("layout does not fit in GPU memory:\n  " + "\n  ".join(fit_errors)
                        + "\n" + "\n".join(lines))
    lines += [f"WARNING: {w}" for w in warnings]
    return Plan(lines, numbers, placement, warnings)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--fill", action="store_true",
                   help="scale data-parallel sizes and vLLM engines to the cluster (prints the overrides)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length bound for KV/time (default 1024)")
    p.add_argument("--gpu-memory-gib", type=float, default=GPU.memory_gib, help="GPU memory (default H100 80 GB)")
    p.add_argument("--sync-gb-s", type=float, default=None,
                   help="weight-sync bandwidth in GB/s for the step estimate (default: the GPU model's "
                        "assumption for the chosen transport; put a measured number here)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON: gpus_requested, gpus_available, every group's bundles, numbers")


def run_plan(cfg: TPPOConfig, args: argparse.Namespace, out=None) -> int:
    """Print the plan for ``cfg`` (CLI args from :func:`add_plan_args`); 0 when it fits, 3 when not."""
    out = out or sys.stdout
    try:
        if args.nodes is None or args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError("--nodes and --gpus-per-node must be >= 1")
        cfg = copy.deepcopy(cfg)
        if args.fill:
            over = fill_layout(cfg, args.nodes * args.gpus_per_node)
            cfg.validate()
            print("layout filled to the cluster; pass these overrides: " + " ".join(over), file=out)
        gpu = GPU(memory_gib=args.gpu_memory_gib)
        if getattr(args, "sync_gb_s", None):
            gpu = dataclasses.replace(gpu, sync_nccl_gb_s=args.sync_gb_s, sync_gloo_gb_s=args.sync_gb_s)
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, gpu,
                         prompt_tokens=args.prompt_tokens)
    except (PlanError, ConfigError) as err:
        print(f"plan refused: {err}", file=sys.stderr)
        return 3
    if getattr(args, "json", False):
        print(json.dumps(dict(plan.placement.to_json(), numbers=plan.numbers), indent=1), file=out)
    else:
        print("\n".join(plan.lines), file=out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tppo.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config file")
    add_plan_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--compare-modes", action="store_true", help="wall-clock per 1,000 finished responses of PPO, "
                   "T-PPO and continuous T-PPO at 4, 8, 16 nodes (megatron_tppo/projection.py; default config: "
                   "examples/qwen2.5_32b/tppo.yaml)")
    args = p.parse_args(argv)
    if args.compare_modes:
        from megatron_tppo.projection import report

        print(report(load_config(args.config or "examples/qwen2.5_32b/tppo.yaml", args.overrides)))
        return 0
    if args.nodes is None:
        p.error("--nodes is required")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return run_plan(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Seconds: a step's roofline, the start-up, and the waits sized from them (pure arithmetic).

Step (roofline, documented assumptions):
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
- Prefill after a sync (the prefix cache is reset whenever weights load): every slot's context
  before its window, ``prompt + W (m-1)/2`` on average, at ``2N`` + causal attention FLOPs per
  token, compute-bound at half the bf16 peak, per engine over its TP GPUs.
- Weight sync: one bf16 copy of the policy into every engine worker at the transport's
  bandwidth (``GPU.sync_nccl_gb_s`` for nccl/ipc, ``sync_gloo_gb_s`` for host-staged gloo).

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

from megatron_tppo.planning.hardware import GPU, Host
from megatron_tppo.planning.memory import layer_params, model_params

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


def sync_seconds(cfg, transport: str, gpu: GPU = GPU()) -> float:
    bw = (gpu.sync_gloo_gb_s if transport == "gloo" else gpu.sync_nccl_gb_s) * 1e9
    return model_params(cfg.model) * 2.0 / bw


def waits(cfg, nodes: int, transport: str, gpu: GPU = GPU(), host: Host = Host()) -> Waits:
    """The controller's limits for ``cfg`` on ``nodes`` nodes (the projection of :func:`startup`
    with ``train``'s start-up: dummy engine weights, trainer initialization skipped; a resume's
    larger load)."""
    sync = sync_seconds(cfg, transport, gpu)
    s = startup(cfg, nodes, host, resume=True, sync_s=sync)
    return Waits(wait_s(s["engine_start_s"]), wait_s(s["trainer_build_s"] + s["checkpoint_load_s"]), wait_s(sync))


def step_roofline(cfg, gpu: GPU, prompt_tokens: int, kv_capacity_tokens: float, kv_tok: float,
                  vllm_weight_bytes: float, transport: str) -> dict:
    """The step's seconds by phase (module docstring) and the unit costs the projection reads."""
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
    t_sync = sync_seconds(cfg, transport, gpu)
    t_gen, t_train = t_decode + t_prefill, max(t_pol, t_cri)
    return dict(
        ctx=ctx, batch=batch, t_iter=t_iter, gen_decode_s=t_decode, reprefill_s=t_prefill, gen_s=t_gen,
        policy_train_s=t_pol, critic_train_s=t_cri, train_s=t_train, sync_s=t_sync, step_s=t_gen + t_train + t_sync,
        policy_pflop=pol_flops / 1e15, critic_pflop=cri_flops / 1e15, peak_tflops=peak / 1e12,
        gen_tokens=float(r.num_slots * r.window_tokens), prefill_ctx=prefill_ctx,
        reprefill_tokens_per_engine=slots_per_engine * prefill_ctx, slots_per_engine=float(slots_per_engine),
        # unit costs for models that count their own tokens (projection.py)
        decode_weights_s=vllm_weight_bytes / bw, decode_kv_s_per_token=kv_tok / bw,
        decode_compute_s_per_seq=2 * n_policy / prefill_peak,
        policy_s_per_flop=1.0 / (pol.world_size * peak * gpu.train_mfu),
        critic_s_per_flop=1.0 / (cri.world_size * peak * gpu.train_mfu),
        prefill_s_per_flop=1.0 / prefill_peak, attn_flops_per_ctx=2.0 * m.num_layers * m.hidden_size)

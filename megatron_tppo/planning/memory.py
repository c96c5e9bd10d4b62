"""Per-GPU and per-host memory of every component: pure counting on the config (no torch import).

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
- What each component holds in each phase of a run, with the CUDA context, NCCL reserve,
  fragmentation and headroom (:mod:`megatron_tppo.planning.hardware`), is the memory schedule's
  (:mod:`megatron_tppo.planning.schedule`); this module only counts.

"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tppo.config import LayoutConfig, ModelConfig

from megatron_tppo.planning.hardware import GiB  # noqa: F401  (re-exported)


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

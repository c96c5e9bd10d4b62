"""Qwen2/Llama-family policy (and critic backbone) as a megatron-core GPTModel.

Architecture from :class:`~megatron_tppo.config.ModelConfig`: RMSNorm, SwiGLU MLP, RoPE with base
``rope_theta``, grouped-query attention, optional Q/K/V bias, tied or untied embeddings, no other
biases, dropout 0. The vocabulary is padded to ``padded_vocab_size`` (layout independent); the
engine masks the padded rows out of every softmax.

Layout-independent initialization. ``use_cpu_initialization=True`` makes every tensor-parallel
weight from one full master weight on the CPU RNG, then slices it, so TP=2 equals TP=1. Pipeline
stages, however, build different subsets of layers, so the plain global RNG would give PP=2
different weights than PP=1. Hence each transformer layer is built under its own seed derived from
(seed, global layer number) (:class:`SeededTransformerLayer`), the embedding is the first RNG
consumer of the model under a fixed seed, and an untied output layer is re-drawn from its own seed.
The same seed therefore gives the same model at every TP/PP layout.

Skipped initialization (``init_weights=False``), for a caller that loads every weight next (an HF
model or a checkpoint): no master weights, no random draws. Tensors are allocated in place
(``use_cpu_initialization=False``: on the GPU directly, on CPU through the shim) and megatron's
init functions are replaced by :func:`_unset_weight`, which fills NaN so that a weight the load
missed cannot pass unnoticed. ``perform_initialization`` stays True on purpose: megatron-core
0.16.1 marks a tensor-parallel weight (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``) inside its init helpers, so ``perform_initialization=False`` would leave TP
shards unmarked, and the HF loader, the weight gather and grad-norm clipping all read those marks.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.models.fp8 import check_fp8_support, fp8_transformer_kwargs, transformer_engine_available

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Tags mixed into the model seed (see derive_seed): one per independently initialized part.
_TAG_EMBEDDING, _TAG_OUTPUT, _TAG_VALUE_HEAD, _TAG_LAYER0 = 1, 2, 3, 1000


def derive_seed(seed: int, tag: int) -> int:
    """A deterministic per-part seed (a simple LCG-style mix keeps seeds distinct across tags)."""
    return (seed * 1_000_003 + tag) % (2**63 - 1)


def _unset_weight(weight: torch.Tensor) -> None:
    """Init method of a skipped initialization: NaN (one fill, no RNG; a load overwrites it)."""
    with torch.no_grad():
        weight.fill_(float("nan"))


def transformer_config(m: ModelConfig, tp: int, pp: int, device: str, recompute: str = "none",
                       init_weights: bool = True):
    """megatron-core TransformerConfig for ``m`` at tensor/pipeline sizes ``tp``/``pp``.

    On CPU every fused kernel is off (they are CUDA kernels); on GPU with Transformer Engine the
    bias-SwiGLU and RoPE fusions are on, and FP8 settings are mapped from ``m.fp8``/``m.fp8_recipe``.
    ``init_weights=False``: see the module doc (weights allocated where they live, NaN-filled).
    """
    check_fp8_support(m.fp8, device)  # before importing megatron: fail fast and clearly
    from megatron.core.transformer import TransformerConfig

    use_te = device == "cuda" and transformer_engine_available()
    dtype = _DTYPES[m.params_dtype]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # one full master weight per tensor on the CPU RNG (layout independent), or none at all
        use_cpu_initialization=init_weights,
        perform_initialization=True,  # also when skipped: megatron marks TP shards in its init helpers
        **({} if init_weights else dict(init_method=_unset_weight, output_layer_init_method=_unset_weight,
                                        embedding_init_method=_unset_weight)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=m.params_dtype == "bf16",
        fp16=m.params_dtype == "fp16",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        # micro-batches are length-sorted, so each has its own [B, T]: pipeline p2p exchanges shapes
        variable_seq_lengths=True,
        # dense model: no MoE, but the config refuses variable lengths with the default dispatcher
        moe_token_dispatcher_type="alltoall",
        attention_softmax_in_fp32=True,
        bias_activation_fusion=use_te,
        apply_rope_fusion=use_te,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        # no CUDA graphs; [] is what megatron-core turns its default "full" into, with a deprecation warning
        cuda_graph_scope=[],
        **fp8_transformer_kwargs(m.fp8, m.fp8_recipe),
        # full recompute keeps only each layer's input and redoes the layer in backward
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if recompute == "full" else {}),
    )


def _seeded_layer_class():
    """TransformerLayer subclass that builds its weights under a seed of its global layer number."""
    from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
    from megatron.core.utils import get_pg_rank

    class SeededTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, layer_number: int = 1, *, init_seed: int = 0,
                     pg_collection=None, vp_stage=None, **kwargs):
            pp_group = pg_collection.pp if pg_collection is not None else None
            if pp_group is None:
                from megatron.core import parallel_state

                pp_group = parallel_state.get_pipeline_model_parallel_group()
            global_layer = layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pp_group))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(init_seed, _TAG_LAYER0 + global_layer))
                super().__init__(config, submodules, layer_number=layer_number,
                                 pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)

    return SeededTransformerLayer


def layer_spec(device: str, seed: int):
    """The decoder layer ModuleSpec: Transformer Engine on GPU when TE imports, else local torch."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    if device == "cuda" and transformer_engine_available():
        base = get_gpt_layer_with_transformer_engine_spec()
    else:
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
    params = dict(base.params or {})
    params["init_seed"] = seed
    return ModuleSpec(module=_seeded_layer_class(), params=params, submodules=base.submodules)


def _redraw_output_layer(model, m: ModelConfig, seed: int) -> None:
    """Re-initialize an untied vocab-parallel output layer [V_pad/tp, H] from its own seed."""
    from megatron.core import parallel_state

    w = model.output_layer.weight
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    rows = w.shape[0]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _TAG_OUTPUT))
        master = torch.empty(m.padded_vocab_size, m.hidden_size, dtype=torch.float32)
        torch.nn.init.normal_(master, mean=0.0, std=m.init_std)
        w.copy_(master[tp_rank * rows:(tp_rank + 1) * rows].to(w.dtype))


def _seed_cuda_rng_tracker(seed: int) -> None:
    """Give megatron's CUDA RNG tracker its states unless someone did: weights allocated on the GPU
    are initialized under ``get_cuda_rng_tracker().fork()`` (also when the init is a no-op), and the
    local layer spec's attention forks it around its dropout in every forward."""
    from megatron.core import tensor_parallel

    if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_gpt(m: ModelConfig, device: str, seed: int, *, tie_embeddings: Optional[bool] = None,
              recompute: str = "none", init_weights: bool = True):
    """Build this rank's pipeline stage of the GPT model (parallel_state must be initialized).

    Returns a megatron-core GPTModel on ``device`` whose forward gives vocab-parallel logits
    [B, T, V_pad / tp] on the last stage (hidden states elsewhere). ``init_weights=False`` skips
    the random initialization (parameters are NaN until loaded; see the module doc): only for a
    caller that loads every weight next.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if m.padded_vocab_size % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the padded vocabulary {m.padded_vocab_size}")
    tie = m.tie_word_embeddings if tie_embeddings is None else tie_embeddings
    config = transformer_config(m, tp, pp, device, recompute, init_weights)
    if device == "cuda":
        _seed_cuda_rng_tracker(seed)
    with torch.random.fork_rng(devices=[]):
        # The embedding is the first RNG consumer in GPTModel.__init__ (first stage only).
        torch.manual_seed(derive_seed(seed, _TAG_EMBEDDING))
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(device, seed),
            vocab_size=m.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=tie,
            position_embedding_type="rope",
            rotary_base=m.rope_theta,
        )
    if model.post_process and not tie and init_weights:
        _redraw_output_layer(model, m, seed)
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model

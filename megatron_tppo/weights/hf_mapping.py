"""HF <-> megatron-core weight names for the Qwen2/Llama family: pure per-tensor functions.

One mapping serves both directions and both uses (streaming policy weights into vLLM, and the
checkpoint conversion tools). Everything here works on *full* (TP-gathered, all pipeline stages)
tensors on any device; no torch.distributed, no megatron import.

megatron-core GPTModel names (local layer spec; ``N`` is the global layer number from 0):

=============================================================  ===============================
megatron                                                       HF (Qwen2ForCausalLM / Llama)
=============================================================  ===============================
embedding.word_embeddings.weight          [V_pad, H]            model.embed_tokens.weight [V, H]
decoder.layers.N.input_layernorm.weight   [H]                   model.layers.N.input_layernorm.weight
decoder.layers.N.self_attention.linear_qkv.weight  [G*(q+2)*d, H]   ...self_attn.{q,k,v}_proj.weight
decoder.layers.N.self_attention.linear_qkv.bias    [G*(q+2)*d]      ...self_attn.{q,k,v}_proj.bias
decoder.layers.N.self_attention.linear_proj.weight [H, A*d]         ...self_attn.o_proj.weight
decoder.layers.N.pre_mlp_layernorm.weight [H]                   ...post_attention_layernorm.weight
decoder.layers.N.mlp.linear_fc1.weight    [2F, H] = [gate; up]  ...mlp.gate_proj / up_proj.weight
decoder.layers.N.mlp.linear_fc2.weight    [H, F]                ...mlp.down_proj.weight
decoder.final_layernorm.weight            [H]                   model.norm.weight
output_layer.weight                       [V_pad, H]            lm_head.weight [V, H] (untied only)
=============================================================  ===============================

With the Transformer Engine spec the two norms are fused into the following linear layer:
``...self_attention.linear_qkv.layer_norm_weight`` (= input_layernorm) and
``...mlp.linear_fc1.layer_norm_weight`` (= pre_mlp_layernorm); both spellings map to the same HF
name, so the GPU path shares this table (``te=True`` picks the TE names in the inverse direction).

Fused QKV layout: megatron interleaves per query group ``g`` (G = num_query_groups groups, each
with q = A/G query heads of size d): rows ``[q_g0 (q*d), k_g0 (d), v_g0 (d), q_g1, k_g1, v_g1, ...]``.
HF keeps separate q [A*d, H], k [G*d, H], v [G*d, H] with heads in order.

Vocabulary: megatron pads the embedding/output rows to ``padded_vocab_size``; to HF the padding
rows are dropped (``vocab_size`` rows), from HF they are zero-filled. ``model.vocab_size`` must
therefore be the HF config's ``vocab_size`` (the embedding's row count) when converting a real
model. Tied embeddings: HF has no ``lm_head.weight`` (vLLM ties it to the embedding); a gathered
``output_layer.weight`` copy of a tied model (it exists on the last pipeline stage) maps to nothing.

Qwen2 and Llama share every HF name; they differ only in QKV bias and the usual tying, which come
from :class:`~megatron_tppo.config.ModelConfig` (``qkv_bias``, ``tie_word_embeddings``).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import torch

from megatron_tppo.config import ModelConfig

FAMILIES = ("qwen2", "llama")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Per-layer tensors that map one-to-one (megatron suffix -> HF suffix).
_LAYER_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_ONE_TO_ONE = {"decoder.final_layernorm.weight": "model.norm.weight"}
_EMBED, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_HF_EMBED, _HF_OUTPUT = "model.embed_tokens.weight", "lm_head.weight"


def _check_family(m: ModelConfig) -> None:
    if m.arch not in FAMILIES:
        raise ValueError(f"no HF weight map for model.arch={m.arch!r}; known: {FAMILIES}")


def _qkv_sizes(m: ModelConfig) -> tuple[int, int, int]:
    """(groups G, query heads per group q, head size d)."""
    g = m.num_query_groups
    return g, m.num_attention_heads // g, m.head_size


# ---------------------------------------------------------------------------------------------
# Fused-tensor layouts (pure tensor ops; the reference for any faster TP-local variant)
# ---------------------------------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV [G*(q+2)*d, ...] -> HF (q [G*q*d, ...], k [G*d, ...], v [G*d, ...]).

    Works for the weight ([..., H]) and the bias (1-D) alike.
    """
    g, q, d = _qkv_sizes(m)
    if fused.shape[0] != g * (q + 2) * d:
        raise ValueError(f"fused QKV has {fused.shape[0]} rows, expected G*(q+2)*d = {g}*({q}+2)*{d}")
    grouped = fused.reshape(g, (q + 2) * d, *fused.shape[1:])
    qs, ks, vs = torch.split(grouped, [q * d, d, d], dim=1)
    tail = fused.shape[1:]
    return qs.reshape(g * q * d, *tail), ks.reshape(g * d, *tail), vs.reshape(g * d, *tail)


def merge_qkv(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: HF q/k/v -> megatron's per-group interleaved [G*(q+2)*d, ...]."""
    g, q, d = _qkv_sizes(m)
    tail = q_t.shape[1:]
    grouped = torch.cat([q_t.reshape(g, q * d, *tail), k_t.reshape(g, d, *tail), v_t.reshape(g, d, *tail)], dim=1)
    return grouped.reshape(g * (q + 2) * d, *tail)


def _strip_vocab(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    if t.shape[0] < m.vocab_size:
        raise ValueError(f"embedding has {t.shape[0]} rows, fewer than model.vocab_size={m.vocab_size}")
    return t[: m.vocab_size]


def _pad_vocab(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    if t.shape[0] != m.vocab_size:
        raise ValueError(f"HF embedding has {t.shape[0]} rows, model.vocab_size is {m.vocab_size}")
    pad = m.padded_vocab_size - t.shape[0]
    return t if pad == 0 else torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)


# ---------------------------------------------------------------------------------------------
# megatron -> HF
# ---------------------------------------------------------------------------------------------


def megatron_to_hf(name: str, tensor: torch.Tensor, m: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One full megatron tensor -> its HF tensors (views where possible, no copies).

    Returns [] for tensors HF does not have (``_extra_state``, a tied model's output layer).
    Raises KeyError for a name it does not know, so a new parameter never goes silently missing.
    """
    _check_family(m)
    if name.endswith("._extra_state"):
        return []
    if name == _EMBED:
        return [(_HF_EMBED, _strip_vocab(tensor, m))]
    if name == _OUTPUT:
        return [] if m.tie_word_embeddings else [(_HF_OUTPUT, _strip_vocab(tensor, m))]
    if name in _GLOBAL_ONE_TO_ONE:
        return [(_GLOBAL_ONE_TO_ONE[name], tensor)]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"unknown megatron parameter {name!r}")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_ONE_TO_ONE:
        return [(prefix + _LAYER_ONE_TO_ONE[rest], tensor)]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q_t, k_t, v_t = split_qkv(tensor, m)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q_t, k_t, v_t))]
    if rest == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise KeyError(f"unknown megatron parameter {name!r}")


# ---------------------------------------------------------------------------------------------
# HF -> megatron
# ---------------------------------------------------------------------------------------------


def megatron_param_names(m: ModelConfig, te: bool = False) -> list[str]:
    """Every megatron parameter of the full model, in GPTModel's order (local or TE spec)."""
    names = [_EMBED]
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        names.append(p + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"))
        names.append(p + "self_attention.linear_proj.weight")
        names.append(p + "self_attention.linear_qkv.weight")
        if m.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        names.append(p + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"))
        names.append(p + "mlp.linear_fc1.weight")
        names.append(p + "mlp.linear_fc2.weight")
    names.append("decoder.final_layernorm.weight")
    if not m.tie_word_embeddings:
        names.append(_OUTPUT)
    return names


def hf_sources(name: str, m: ModelConfig) -> list[str]:
    """The HF tensor names that make up megatron parameter ``name`` (in merge order)."""
    if name.endswith("._extra_state"):
        return []
    if name == _EMBED or (name == _OUTPUT and m.tie_word_embeddings):
        return [_HF_EMBED]
    if name == _OUTPUT:
        return [_HF_OUTPUT]
    if name in _GLOBAL_ONE_TO_ONE:
        return [_GLOBAL_ONE_TO_ONE[name]]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"unknown megatron parameter {name!r}")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_ONE_TO_ONE:
        return [prefix + _LAYER_ONE_TO_ONE[rest]]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
    if rest == "mlp.linear_fc1.weight":
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]
    raise KeyError(f"unknown megatron parameter {name!r}")


def hf_to_megatron(name: str, hf: Mapping[str, torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """Build megatron parameter ``name`` (full, vocab padded) from the HF tensors it is made of."""
    _check_family(m)
    srcs = [hf[s] for s in hf_sources(name, m)]
    if name in (_EMBED, _OUTPUT):
        return _pad_vocab(srcs[0], m)
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return merge_qkv(*srcs, m)
    if name.endswith("mlp.linear_fc1.weight"):
        return torch.cat(srcs, dim=0)
    (src,) = srcs
    return src


# ---------------------------------------------------------------------------------------------
# Whole state dicts
# ---------------------------------------------------------------------------------------------


def iter_megatron_to_hf(named: Iterable[tuple[str, torch.Tensor]], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (megatron name, full tensor) -> (HF name, tensor), one source tensor at a time."""
    for name, tensor in named:
        yield from megatron_to_hf(name, tensor, m)


def megatron_state_dict_to_hf(sd: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megatron state dict -> HF state dict (contiguous copies, safe to save)."""
    return {k: v.contiguous().clone() for k, v in iter_megatron_to_hf(sd.items(), m)}


def hf_state_dict_to_megatron(sd: Mapping[str, torch.Tensor], m: ModelConfig, te: bool = False) -> dict[str, torch.Tensor]:
    """Full HF state dict -> megatron state dict (local spec, or TE spec with ``te=True``).

    Every HF tensor must be used (a tied model's ``lm_head.weight`` may be present and is then
    ignored); a leftover or missing tensor raises, naming it.
    """
    out, used = {}, set()
    for name in megatron_param_names(m, te=te):
        missing = [s for s in hf_sources(name, m) if s not in sd]
        if missing:
            raise KeyError(f"HF state dict lacks {missing} needed for megatron {name!r}")
        out[name] = hf_to_megatron(name, sd, m).contiguous().clone()
        used.update(hf_sources(name, m))
    if m.tie_word_embeddings:
        used.add(_HF_OUTPUT)
    leftover = sorted(set(sd) - used - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
    if leftover:
        raise KeyError(f"HF tensors with no megatron counterpart: {leftover[:8]}")
    return out

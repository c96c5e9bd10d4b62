"""ModelConfig <-> Hugging Face config, and random HF models made offline (no model hub here).

``transformers`` is imported inside the functions that need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from megatron_tppo.config import ModelConfig


def hf_config_kwargs(m: ModelConfig, eos_token_id: int | None = None) -> dict:
    """Keyword arguments of ``Qwen2Config`` / ``LlamaConfig`` describing the same model as ``m``.

    Qwen2 in HF always has Q/K/V bias and Llama's ``attention_bias`` would also add an o_proj bias,
    so ``qkv_bias`` must be True for qwen2 and False for llama.
    """
    if m.arch == "qwen2" and not m.qkv_bias:
        raise ValueError("model.arch=qwen2 has Q/K/V bias in HF; set model.qkv_bias=True")
    if m.arch == "llama" and m.qkv_bias:
        raise ValueError("model.arch=llama: HF Llama cannot have a Q/K/V-only bias; set model.qkv_bias=False")
    kw = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.head_size,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings, hidden_act="silu",
        initializer_range=m.init_std, dtype="float32",
        eos_token_id=m.vocab_size - 1 if eos_token_id is None else eos_token_id,
        bos_token_id=0, pad_token_id=None,
    )
    if m.arch == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    else:
        kw.update(use_sliding_window=False)
    return kw


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig for an HF config.json dict (Qwen2/Llama); ``overrides`` win."""
    arch = "qwen2" if hf.get("model_type") == "qwen2" else "llama"
    if hf.get("model_type") not in ("qwen2", "llama"):
        raise ValueError(f"unsupported HF model_type {hf.get('model_type')!r}")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    kw = dict(arch=arch, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
              ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
              num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
              vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
              rope_theta=float(rope), norm_epsilon=hf["rms_norm_eps"], qkv_bias=arch == "qwen2",
              tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    kw.update(overrides)
    return ModelConfig(**kw)


def random_hf_model(m: ModelConfig, seed: int = 0):
    """A randomly initialized ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (fp32, eval mode)."""
    import transformers

    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[m.arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg_cls(**hf_config_kwargs(m)))
        # HF zero-initializes biases and ones the norms; random values exercise the maps fully.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def save_random_hf_model(m: ModelConfig, path: Union[str, Path], seed: int = 0) -> Path:
    """Write a random HF model for ``m`` (config.json, generation_config.json, safetensors) to ``path``."""
    path = Path(path)
    random_hf_model(m, seed).save_pretrained(path, safe_serialization=True)
    return path

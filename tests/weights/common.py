"""Shared tiny model configs and batch for the weights tests."""
import dataclasses

import torch

from megatron_tppo.config import ModelConfig

SEED = 4321
QWEN = ModelConfig(arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                   num_query_groups=2, vocab_size=203, max_position_embeddings=64, rope_theta=10000.0,
                   qkv_bias=True, tie_word_embeddings=True)
LLAMA = dataclasses.replace(QWEN, arch="llama", qkv_bias=False, tie_word_embeddings=False, num_query_groups=4)
MODELS = {"qwen_tied_gqa": QWEN, "llama_untied_mha": LLAMA}


def batch(m: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, m.vocab_size, (3, 20), generator=g)
    attn = torch.ones(3, 20)
    attn[1, 14:] = 0
    return {"tokens": tokens * attn.long(), "attention_mask": attn}

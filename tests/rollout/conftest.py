"""Fixtures for the rollout tests: a tiny random Qwen2 saved offline, ONE in-process vLLM engine and
ONE TP=2 engine (multiprocess) per session.

vLLM takes 3-20 s to start, so every test that needs a live engine shares the session's engine;
a test that changes its weights puts the originals back before it returns.
"""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.config import ModelConfig

# head size 32: the smallest vLLM's CPU attention accepts. vocab 300 pads to 384 in megatron.
TINY_QWEN2 = dict(arch="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                  num_query_groups=2, vocab_size=300, max_position_embeddings=256, rope_theta=10000.0,
                  qkv_bias=True, tie_word_embeddings=True)
TINY_LLAMA = dict(TINY_QWEN2, arch="llama", qkv_bias=False, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_cfg() -> ModelConfig:
    return ModelConfig(**TINY_QWEN2)


@pytest.fixture(scope="session")
def tiny_llama_cfg() -> ModelConfig:
    return ModelConfig(**TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_qwen2_cfg):
    from megatron_tppo.weights.hf_config import save_random_hf_model

    return save_random_hf_model(tiny_qwen2_cfg, tmp_path_factory.mktemp("tiny_qwen2"), seed=1)


@pytest.fixture(scope="session")
def hf_qwen2(tiny_qwen2_dir):
    """The HF transformers model of the engine's weights (the numerical reference)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine(tiny_qwen2_dir):
    from megatron_tppo.rollout import create_engine

    eng = create_engine("vllm", tiny_qwen2_dir, max_model_len=256, cpu_kv_cache_gb=1, max_num_seqs=16, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def engine_tp2(tiny_qwen2_dir):
    """ONE TP=2 engine per session: vLLM's multiprocess executor, a worker process per rank, each
    bound to its own core (30-60 s to start). Tests that change its weights put them back."""
    from megatron_tppo.rollout import create_engine

    eng = create_engine("vllm", tiny_qwen2_dir, max_model_len=256, cpu_kv_cache_gb=1, max_num_seqs=16, seed=0,
                        tensor_parallel=2)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def hf_logprobs():
    """``hf_logprobs(model, seq, start)``: see :func:`hf_token_logprobs`."""
    return hf_token_logprobs


def hf_token_logprobs(model, seq: list[int], start: int) -> torch.Tensor:
    """Log-probs [len(seq) - start] of ``seq[start:]`` under an HF causal LM, each after its prefix."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    idx = torch.arange(start, len(seq))
    return logp[idx - 1, torch.tensor(seq[start:])]

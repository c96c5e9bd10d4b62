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


DUMMY_CHECK_SEQS = [[5, 17, 42, 99, 3, 61, 7, 250, 11], [250, 7, 8, 9, 100, 2]]


@pytest.fixture(scope="session")
def engine_tp2_start(tiny_qwen2_dir, hf_qwen2):
    """ONE TP=2 engine per session: vLLM's multiprocess executor, a worker process per rank, each
    bound to its own core (30-60 s to start). It starts from dummy weights, as a run's engines do,
    and the tiny model's weights are loaded through its workers before any test uses it (so every
    TP=2 test checks that the load overwrote everything). Tests that change its weights put them back.

    Yields (engine, start): ``start["refused"]``: the error generating gave before the load;
    ``start["dummy_logprobs"]``: ``DUMMY_CHECK_SEQS``' prompt log-probs of the dummy weights (read
    from vLLM directly, past the engine's refusal)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from megatron_tppo.rollout import create_engine

    eng = create_engine("vllm", tiny_qwen2_dir, max_model_len=256, cpu_kv_cache_gb=1, max_num_seqs=16, seed=0,
                        tensor_parallel=2, load_format="dummy")
    start = {}
    try:
        eng.prompt_logprobs(DUMMY_CHECK_SEQS)
    except RuntimeError as err:
        start["refused"] = str(err)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = eng.llm.generate([TokensPrompt(prompt_token_ids=s) for s in DUMMY_CHECK_SEQS], params, use_tqdm=False)
    start["dummy_logprobs"] = [[pos[tok].logprob for tok, pos in zip(s[1:], out.prompt_logprobs[1:])]
                               for s, out in zip(DUMMY_CHECK_SEQS, outs)]
    eng.load_weights(hf_qwen2.state_dict().items(), version=0)
    yield eng, start
    eng.shutdown()


@pytest.fixture(scope="session")
def engine_tp2(engine_tp2_start):
    return engine_tp2_start[0]


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

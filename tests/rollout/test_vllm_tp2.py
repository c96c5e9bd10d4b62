"""A TP=2 engine (vLLM's multiprocess executor, one worker process per rank), started from dummy
weights and then loaded, behaves as the TP=1 engine (started from the checkpoint): the same greedy
tokens, log-probs within 1e-4, windows resumed from token ids equal one run, and weights loaded
from this process (broadcast to the workers over a local gloo group)."""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.rollout import Sampling
from megatron_tppo.rollout.vllm_backend import cpu_bind_mask

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 99, 3], [250, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
GREEDY = Sampling(temperature=0.0)


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def test_cpu_bind_mask():
    assert cpu_bind_mask(2, [0, 1]) == "0|1"
    assert cpu_bind_mask(2, [3, 1, 2, 0, 4]) == "0,1,2|3,4"
    assert cpu_bind_mask(4, [0, 1]) == "0|1|0|1"  # fewer cores than workers: shared, round-robin


def test_tp2_runs_worker_processes(engine_tp2):
    devices = engine_tp2.weight_transfer_devices()
    assert [d["rank"] for d in devices] == [0, 1] and len({d["pid"] for d in devices}) == 2
    assert engine_tp2.remote_workers


def test_tp2_greedy_equals_tp1(engine, engine_tp2):
    one = engine.generate(PROMPTS, max_tokens=12, sampling=GREEDY)
    two = engine_tp2.generate(PROMPTS, max_tokens=12, sampling=GREEDY)
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert max(max_diff(a.logprobs, b.logprobs) for a, b in zip(one, two)) < 1e-4
    seqs = [p + r.token_ids for p, r in zip(PROMPTS, one)]
    p1, p2 = engine.prompt_logprobs(seqs), engine_tp2.prompt_logprobs(seqs)
    assert max(max_diff(a, b) for a, b in zip(p1, p2)) < 1e-4


def test_tp2_windows_resume_like_one_run(engine, engine_tp2):
    whole = engine.generate(PROMPTS, max_tokens=15, sampling=GREEDY)
    first = engine_tp2.generate(PROMPTS, max_tokens=[5, 7, 4], sampling=GREEDY)
    assert all(r.finish_reason == "length" for r in first)
    rest = engine_tp2.generate([p + r.token_ids for p, r in zip(PROMPTS, first)],
                               max_tokens=[10, 8, 11], sampling=GREEDY)
    for w, a, b in zip(whole, first, rest):
        assert a.token_ids + b.token_ids == w.token_ids
        assert max_diff(a.logprobs + b.logprobs, w.logprobs) < 1e-4


def test_tp2_dummy_start_is_refused_far_off_and_fully_overwritten(engine_tp2_start, hf_qwen2, hf_logprobs):
    """The session's TP=2 engine started from dummy weights (conftest): generating was refused until
    the load, the dummy weights' log-probs are far from the model's, and after the load every
    log-prob is the model's (vLLM's reload rebuilt every layer in both workers)."""
    from tests.rollout.conftest import DUMMY_CHECK_SEQS

    engine_tp2, start = engine_tp2_start
    assert "dummy weights" in start["refused"], start
    got = engine_tp2.prompt_logprobs(DUMMY_CHECK_SEQS)
    for seq, dummy, loaded in zip(DUMMY_CHECK_SEQS, start["dummy_logprobs"], got):
        want = hf_logprobs(hf_qwen2, seq, 1)
        assert (torch.tensor(dummy, dtype=torch.float64) - want).abs().max() > 0.1  # a missed layer would show
        assert torch.allclose(torch.tensor(loaded, dtype=torch.float64), want, atol=1e-4)


def test_tp2_load_weights_through_workers(engine_tp2, hf_qwen2, tiny_qwen2_cfg, hf_logprobs):
    from megatron_tppo.weights.hf_config import random_hf_model

    other = random_hf_model(tiny_qwen2_cfg, seed=6)
    seq = [11, 22, 33, 44, 55, 66, 77]
    try:
        engine_tp2.load_weights(other.state_dict().items(), version=4, bucket_bytes=32 << 10)
        (lp,) = engine_tp2.prompt_logprobs([seq])
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), hf_logprobs(other, seq, 1), atol=1e-4)
        assert engine_tp2.generate([seq], max_tokens=1)[0].policy_version == 4
    finally:
        engine_tp2.load_weights(hf_qwen2.state_dict().items(), version=0)
    (lp,) = engine_tp2.prompt_logprobs([seq])
    assert torch.allclose(torch.tensor(lp, dtype=torch.float64), hf_logprobs(hf_qwen2, seq, 1), atol=1e-4)

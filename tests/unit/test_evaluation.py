"""megatron_tppo.evaluation against plain references: a loop over the same prompts and samples that
calls the reward function directly, and the bootstrap standard error against its closed form."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from megatron_tppo.evaluation import bootstrap_se, length_edges, score_samples, summarize
from megatron_tppo.rewards.arith import arith_reward


def decode(ids):
    return "".join(chr(i) for i in ids)


def encode(text):
    return [ord(c) for c in text]


def make_case(num_prompts=9, k=3, cap=64, seed=0):
    """Prompts with answers and prompt-major samples, some correct, of varied lengths (some at the cap)."""
    rng = random.Random(seed)
    metas = [{"answer": rng.randint(-50, 50)} for _ in range(num_prompts)]
    samples = []
    for m in metas:
        for _ in range(k):
            guess = m["answer"] if rng.random() < 0.4 else m["answer"] + rng.randint(1, 9)
            text = "x" * rng.randint(0, cap - 6) + f"#{guess}"
            samples.append(encode(text)[:cap] if rng.random() > 0.2 else encode("y" * cap))
    return metas, samples


def plain_reference(metas, samples, k, edges):
    """The plain loop: reward function called directly on every sample."""
    correct, total, length_sum = 0.0, 0, 0
    in_bucket = {b: [] for b in range(len(edges) - 1)}
    for i, meta in enumerate(metas):
        for j in range(k):
            ids = samples[i * k + j]
            r = arith_reward(decode(ids), meta)
            correct += r
            total += 1
            length_sum += len(ids)
            for b in range(len(edges) - 1):
                if edges[b] <= len(ids) < edges[b + 1] or (b == len(edges) - 2 and len(ids) == edges[-1]):
                    in_bucket[b].append(r)
                    break
    buckets = [(len(v), sum(v) / len(v) if v else None) for v in in_bucket.values()]
    return correct / total, length_sum / total, buckets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_a_plain_loop_with_the_reward_called_directly(seed):
    k, cap = 3, 64
    metas, samples = make_case(k=k, cap=cap, seed=seed)
    rewards, lengths = score_samples(samples, metas, k, decode, arith_reward)
    report = summarize(rewards, lengths, cap, seed=seed)
    acc, mean_len, buckets = plain_reference(metas, samples, k, length_edges(cap))
    assert 0 < acc < 1  # the case is not degenerate
    assert report.accuracy == pytest.approx(acc, abs=1e-12)
    assert report.response_length_mean == pytest.approx(mean_len, abs=1e-12)
    assert [(b.count, b.accuracy) for b in report.buckets] == [
        (n, pytest.approx(a, abs=1e-12) if a is not None else None) for n, a in buckets]
    assert sum(b.count for b in report.buckets) == len(samples)
    assert report.buckets[-1].count > 0  # the capped responses land in the last, closed bucket
    assert (report.num_prompts, report.samples_per_prompt) == (len(metas), k)
    assert report.rewards == [[arith_reward(decode(samples[i * k + j]), metas[i]) for j in range(k)]
                              for i in range(len(metas))]
    m = report.metrics("eval/")
    assert set(m) == {"eval/accuracy", "eval/accuracy_se", "eval/response_length_mean"}
    assert m["eval/accuracy_se"] == report.accuracy_se > 0
    assert "pass@1" in report.table() and f"{report.accuracy:.4f}" in report.table()


def test_bootstrap_se_matches_its_closed_form():
    """The bootstrap SE of a mean tends to pstdev(values) / sqrt(n) as the resamples grow."""
    rng = random.Random(3)
    values = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(40)]
    exact = statistics.pstdev(values) / math.sqrt(len(values))
    assert bootstrap_se(values, resamples=20000, seed=1) == pytest.approx(exact, rel=0.03)
    # by hand, two prompts at 0 and 1: resampled means 0, 0.5, 1 with odds 1:2:1, sd sqrt(1/8)
    assert bootstrap_se([0.0, 1.0], resamples=40000, seed=2) == pytest.approx(math.sqrt(1 / 8), rel=0.02)


def test_bootstrap_is_over_prompts_not_samples():
    """Prompts that are all right or all wrong: resampling prompts sees the spread, not k."""
    rewards = [[1.0] * 4] * 5 + [[0.0] * 4] * 5
    lengths = [[10] * 4] * 10
    report = summarize(rewards, lengths, 16, resamples=20000, seed=0)
    per_prompt = [sum(r) / 4 for r in rewards]
    assert report.accuracy_se == pytest.approx(statistics.pstdev(per_prompt) / math.sqrt(10), rel=0.03)


def test_bootstrap_is_seeded():
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0]
    assert bootstrap_se(values, seed=7) == bootstrap_se(values, seed=7)
    assert bootstrap_se(values, seed=7) != bootstrap_se(values, seed=8)
    assert bootstrap_se([1.0]) == 0.0


def test_length_edges_and_shape_errors():
    assert length_edges(1024) == [0, 128, 256, 512, 1024]
    assert length_edges(3) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="same number"):
        summarize([[1.0, 0.0], [1.0]], [[1, 2], [3]], 8)
    with pytest.raises(ValueError, match="outside the edges"):
        summarize([[1.0]], [[9]], 8)
    with pytest.raises(ValueError, match="samples for"):
        score_samples([[1]], [{}, {}], 1, decode, arith_reward)

"""Policy/critic batches from segments, checked against a direct per-segment computation."""
import functools
import pickle
import random

import pytest
import torch

from megatron_tppo.algorithms.losses import explained_variance
from megatron_tppo.algorithms.objectives import critic_objective, explained_variance_from_sums, policy_objective
from megatron_tppo.algorithms.tppo_batch import ResponseInput, SegmentInput, critic_batch, policy_batch
from tests.unit.test_egae import egae_reference


def _segments(seed=0, n=7, window=6):
    rng = random.Random(seed)
    segs = []
    for _ in range(n):
        prompt_len = rng.randint(1, 4)
        start = rng.choice([0, window, 2 * window])
        end = start + rng.randint(1, window)
        tokens = [rng.randint(1, 50) for _ in range(prompt_len + end)]
        segs.append(SegmentInput(tokens, prompt_len, start, end, [rng.uniform(-3, 0) for _ in range(end - start)],
                                 [rng.uniform(-1, 1) for _ in range(end - start)], rng.random() < 0.5,
                                 float(rng.random() < 0.5)))
    return segs


def test_policy_batch_against_direct_computation():
    segs = _segments()
    W, tail = 6, 2
    b = policy_batch(segs, window_tokens=W, tail_ignore=tail, advantage_clamp=0.0)
    raw, keep = [], []
    for i, s in enumerate(segs):
        row = b["tokens"][i]
        assert row[: len(s.token_ids)].tolist() == s.token_ids and int(row[len(s.token_ids):].abs().sum()) == 0
        pos = list(range(s.prompt_len + s.start, s.prompt_len + s.end))
        assert torch.nonzero(b["loss_mask"][i]).flatten().tolist() == pos
        assert b["old_logprobs"][i, pos].tolist() == pytest.approx(s.logprobs)
        # per-segment EGAE with the VAPO lambda from the length (plus half a window if truncated)
        L = s.end if s.finished else s.end + W / 2
        lam = max(0.95, 1 - 1 / (0.05 * L))
        r = torch.zeros(1, len(pos))
        if s.finished:
            r[0, -1] = s.reward
        a, _ = egae_reference(r, torch.tensor([s.values]), torch.ones(1, len(pos), dtype=torch.bool),
                              torch.tensor([s.finished]), gamma=1.0, lam=lam)
        k = len(pos) if s.finished else max(0, len(pos) - tail)
        raw += a[0, :k].tolist()
        keep.append((i, pos[:k], pos[k:]))
    mean = sum(raw) / len(raw)
    std = (sum((x - mean) ** 2 for x in raw) / len(raw)) ** 0.5
    got = []
    for i, kept, dropped in keep:
        got += b["advantages"][i, kept].tolist()
        assert all(v == 0 for v in b["advantages"][i, dropped].tolist())
    assert got == pytest.approx([(x - mean) / std for x in raw], abs=1e-4)
    assert int(b["num_tokens"]) == sum(s.end - s.start for s in segs)
    assert b["positive"].tolist() == [s.finished and s.reward >= 1 for s in segs]


def test_policy_batch_rejects_inconsistent_segments():
    s = _segments(n=1)[0]
    s.values = s.values[:-1] + [] if len(s.values) > 1 else []
    with pytest.raises(ValueError, match="segment 0"):
        policy_batch([s])
    with pytest.raises(ValueError, match="at least one"):
        policy_batch([])


def test_critic_batch_monte_carlo_targets():
    resp = [ResponseInput([5, 6, 7, 8, 9], 2, [0.1, 0.2, 0.3], 1.0), ResponseInput([5, 6], 1, [0.5], 0.0)]
    b = critic_batch(resp)
    assert b["returns"][0].tolist() == pytest.approx([0, 0, 1, 1, 1])
    assert b["returns"][1].tolist() == pytest.approx([0, 0, 0, 0, 0])
    assert b["old_values"][0, 2:5].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert int(b["num_tokens"]) == 4
    with pytest.raises(ValueError, match="response 0"):
        critic_batch([ResponseInput([1, 2, 3], 1, [0.0], 1.0)])


def test_objectives_add_up_over_micro_batches_and_pickle():
    segs = _segments(seed=3, n=6)
    b = policy_batch(segs, window_tokens=6)
    gen = torch.Generator().manual_seed(3)  # unseeded, a loss near 0 made the relative bound flaky
    logp = b["old_logprobs"] + 0.1 * torch.randn(b["old_logprobs"].shape, generator=gen) * b["loss_mask"]
    fn = pickle.loads(pickle.dumps(functools.partial(policy_objective, positive_lm_coef=0.1)))
    n = float(b["num_tokens"])
    full, mfull = fn({"logprobs": logp}, b, n)
    parts = [fn({"logprobs": logp[i:i + 2]}, {k: v[i:i + 2] for k, v in b.items() if v.dim() > 0}, n)
             for i in range(0, 6, 2)]
    assert sum(p[0].item() for p in parts) == pytest.approx(full.item(), rel=1e-5, abs=1e-7)
    assert sum(p[1]["clip_fraction"].item() for p in parts) == pytest.approx(mfull["clip_fraction"].item(), abs=1e-6)
    mism = ((logp - b["old_logprobs"]).abs() * b["loss_mask"]).sum() / n
    assert mfull["logprob_abs_diff"].item() == pytest.approx(mism.item(), rel=1e-5)


def test_critic_objective_explained_variance_matches_direct():
    resp = [ResponseInput([1] * 9, 3, [0.1 * i for i in range(6)], 1.0),
            ResponseInput([1] * 6, 2, [0.3, -0.2, 0.0, 0.4], 0.0)]
    b = critic_batch(resp)
    v = b["old_values"] + 0.05
    loss, m = critic_objective({"values": v}, b, float(b["num_tokens"]))
    ev = explained_variance(v, b["returns"], b["loss_mask"]).item()
    assert explained_variance_from_sums({k: x.item() for k, x in m.items()}) == pytest.approx(ev, abs=1e-5)

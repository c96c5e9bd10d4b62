"""Losses against hand-computed cases and a direct per-token formula."""
import math

import pytest
import torch

from megatron_tppo.algorithms.losses import (
    entropy_from_logits,
    entropy_loss,
    explained_variance,
    kl_penalty,
    masked_whiten,
    policy_loss,
    positive_lm_loss,
    token_mean,
    truncated_tail_mask,
    value_loss,
)


def pg_token(logp, old, adv, cl=0.2, ch=0.28, c=10.0):
    """Direct scalar formula of the dual-clip, clip-higher PPO token loss."""
    ratio = math.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - cl), 1 + ch)
    loss = max(unclipped, clipped)
    if adv < 0 and c > 0:
        loss = min(loss, -adv * c)
    return loss


def test_policy_loss_hand_cases():
    # ratio 1.5 with A > 0: clipped at 1.28 -> but max(-1.5A, -1.28A) = -1.28A
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(20.0), 0.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, met = policy_loss(logp, old, adv, mask, num_tokens=4)
    # token0: max(-1.5, -1.28) = -1.28; token1: ratio .5, A<0: max(.5, .8) = .8;
    # token2: ratio 20, A<0: max(20, 1.28) = 20, dual clip min(20, 10) = 10; token3: -2
    expected = (-1.28 + 0.8 + 10.0 - 2.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert met["clip_fraction"].item() == pytest.approx(2 / 4)  # tokens 0 and 1 clipped
    assert met["dual_clip_fraction"].item() == pytest.approx(1 / 4)
    assert met["ratio_max"].item() == pytest.approx(20.0, rel=1e-6)
    assert met["ratio_min"].item() == pytest.approx(0.5, rel=1e-6)


def test_policy_loss_direct_formula_and_global_normalizer():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 17
    logp = torch.randn(B, T, generator=g) * 0.3 - 1
    old = logp + torch.randn(B, T, generator=g) * 0.4
    adv = torch.randn(B, T, generator=g) * 3
    mask = torch.rand(B, T, generator=g) < 0.7
    n = int(mask.sum())
    loss, _ = policy_loss(logp, old, adv, mask, num_tokens=n)
    ref = sum(pg_token(float(logp[b, t]), float(old[b, t]), float(adv[b, t]))
              for b in range(B) for t in range(T) if mask[b, t]) / n
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    # micro-batch split with the global count passed in sums to the same loss
    parts = [policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], num_tokens=n)[0]
             for i in range(0, B, 2)]
    assert sum(p.item() for p in parts) == pytest.approx(loss.item(), rel=1e-5)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), num_tokens=2)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2, rel=1e-5)


def test_empty_batch_gives_zero_not_nan():
    loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), num_tokens=0)
    assert loss.item() == 0.0


def test_positive_lm_loss():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, met = positive_lm_loss(logp, mask, torch.tensor([True, False]), num_tokens=2)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2)
    assert met["positive_tokens"].item() == 2


def test_value_loss_clipped():
    v = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 3.0]])
    loss, met = value_loss(v, old, ret, torch.ones(1, 3), num_tokens=3, clip=0.5)
    # tok0: err (1-0)^2 = 1, v_clip = .5 -> .25; max = 1
    # tok1: err 1, v_clip = 0 -> 1; max 1
    # tok2: err 1, v_clip = .5 -> 6.25; max 6.25 (clipped)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 6.25) / 3)
    assert met["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss0, _ = value_loss(v, old, ret, torch.ones(1, 3), num_tokens=3, clip=0.0)
    assert loss0.item() == pytest.approx(0.5 * 3 / 3)


def test_entropy_and_kl():
    logits = torch.zeros(1, 2, 8)
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.full((1, 2), math.log(8)))
    e, _ = entropy_loss(ent, torch.tensor([[1, 0]]), num_tokens=1)
    assert e.item() == pytest.approx(math.log(8), rel=1e-6)
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    kl, _ = kl_penalty(logp, ref, torch.ones(1, 2), num_tokens=2, kind="k3")
    d = -0.5
    assert kl.item() == pytest.approx((math.exp(d) - d - 1) / 2, rel=1e-6)
    k1, _ = kl_penalty(logp, ref, torch.ones(1, 2), num_tokens=2, kind="k1")
    assert k1.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="kl kind"):
        kl_penalty(logp, ref, torch.ones(1, 2), 2, kind="k9")


def test_masked_whiten():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g) * 5 + 3
    mask = torch.rand(4, 9, generator=g) < 0.6
    w = masked_whiten(x, mask, clamp=0.0)
    vals = x[mask]
    ref = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(w[mask], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(w[~mask] == 0)
    big = torch.tensor([[0.0] * 99 + [1000.0]])
    assert masked_whiten(big, torch.ones(1, 100), clamp=3.0).max().item() == 3.0


def test_truncated_tail_mask():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    finished = torch.tensor([False, True, False])
    out = truncated_tail_mask(mask, finished, 2)
    assert out.long().tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert torch.equal(truncated_tail_mask(mask, finished, 0), mask)


def test_explained_variance_and_token_mean():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(ret, ret, torch.ones(1, 4)).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), ret, torch.ones(1, 4)).item() == pytest.approx(0.0)
    assert token_mean(ret, torch.tensor([[1, 1, 0, 0]]), 4).item() == pytest.approx(0.75)


def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match="does not match"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1)


def test_masked_whiten_without_centering_keeps_zeros():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, generator=g) + 2.0
    x[1, 2:5] = 0.0
    mask = torch.rand(3, 9, generator=g) < 0.7
    mask[1, 2:5] = True
    w = masked_whiten(x, mask, clamp=0.0, center=False)
    vals = [float(x[b, t]) for b in range(3) for t in range(9) if mask[b, t]]  # plain loop reference
    mean = sum(vals) / len(vals)
    std = (sum((u - mean) ** 2 for u in vals) / len(vals)) ** 0.5
    for b in range(3):
        for t in range(9):
            want = float(x[b, t]) / std if mask[b, t] else 0.0
            assert abs(float(w[b, t]) - want) < 1e-5
    assert torch.all(w[1, 2:5] == 0)


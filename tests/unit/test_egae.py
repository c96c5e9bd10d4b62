"""EGAE: the vectorized implementation against a plain per-row loop (the oracle)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tppo.algorithms.egae import (
    adaptive_policy_lambda,
    compute_egae,
    discounted_suffix_sum,
    monte_carlo_returns,
    policy_lambda_lengths,
)


def egae_reference(token_rewards, values, response_mask, finished, gamma=1.0, lam=0.95, bootstrap=None):
    """The definition, token by token, in float64 Python: the test oracle."""
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        lam_b = float(lam[b]) if torch.is_tensor(lam) and lam.dim() > 0 else float(lam)
        idx = [t for t in range(T) if bool(response_mask[b, t])]
        a_next = 0.0
        for j in range(len(idx) - 1, -1, -1):
            t = idx[j]
            v_t = float(values[b, t])
            if j + 1 < len(idx):
                v_next = float(values[b, idx[j + 1]])
            else:
                v_next = 0.0 if bool(finished[b]) else (v_t if bootstrap is None else float(bootstrap[b]))
            delta = float(token_rewards[b, t]) + gamma * v_next - v_t
            a = delta + gamma * lam_b * a_next
            adv[b, t] = a
            ret[b, t] = a + v_t
            a_next = a
    return adv, ret


def random_case(g, B, T, contiguous=True):
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if contiguous:
            start = int(torch.randint(0, T + 1, (1,), generator=g))
            length = int(torch.randint(0, T - start + 1, (1,), generator=g))
            mask[b, start:start + length] = True
        else:
            mask[b] = torch.rand(T, generator=g) < 0.6
    finished = torch.rand(B, generator=g) < 0.5
    return rewards, values, mask, finished


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 64), (4, 65), (2, 300), (8, 129)])
@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_matches_reference_on_random_shapes(B, T, gamma):
    g = torch.Generator().manual_seed(B * 1000 + T)
    for contiguous in (True, False):
        r, v, m, f = random_case(g, B, T, contiguous)
        lam = torch.rand(B, generator=g) * 0.5 + 0.5
        for lam_arg in (0.95, lam, 1.0, 0.0):
            adv, ret = compute_egae(r, v, m, f, gamma=gamma, lam=lam_arg)
            adv_ref, ret_ref = egae_reference(r, v, m, f, gamma=gamma, lam=lam_arg)
            torch.testing.assert_close(adv.double(), adv_ref, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ret.double(), ret_ref, atol=2e-5, rtol=1e-5)
            assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 150), seed=st.integers(0, 2**31 - 1),
       gamma=st.floats(0.5, 1.0), contiguous=st.booleans(), mask_dtype=st.sampled_from(["bool", "int", "float"]))
def test_matches_reference_property(B, T, seed, gamma, contiguous, mask_dtype):
    g = torch.Generator().manual_seed(seed)
    r, v, m, f = random_case(g, B, T, contiguous)
    lam = torch.rand(B, generator=g)
    m_in = {"bool": m, "int": m.long(), "float": m.float()}[mask_dtype]
    adv, ret = compute_egae(r, v, m_in, f, gamma=gamma, lam=lam)
    adv_ref, ret_ref = egae_reference(r, v, m, f, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv.double(), adv_ref, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(ret.double(), ret_ref, atol=5e-5, rtol=1e-4)


def test_truncated_bootstrap_hand_case():
    # gamma = 1, lam = 1, values 1,2,3 and no rewards: truncated row bootstraps V(s_l) = V(s_{l-1}) = 3,
    # so the last TD error is 0 and every advantage is V_last - V_t; finished row uses 0 after the end.
    r = torch.zeros(2, 4)
    v = torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    f = torch.tensor([False, True])
    adv, ret = compute_egae(r, v, m, f, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == [2.0, 1.0, 0.0, 0.0]
    assert ret[0].tolist() == [3.0, 3.0, 3.0, 0.0]
    assert adv[1].tolist() == [-1.0, -2.0, -3.0, 0.0]
    assert ret[1].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_bootstrap_matches_reference(seed):
    # V(s_l) given per row: truncated rows take it after their last valid token, finished rows ignore it
    g = torch.Generator().manual_seed(seed)
    r, v, m, f = random_case(g, 6, 40, contiguous=seed != 2)
    boot = torch.randn(6, generator=g)
    lam = torch.rand(6, generator=g)
    adv, ret = compute_egae(r, v, m, f, gamma=0.99, lam=lam, bootstrap=boot)
    adv_ref, ret_ref = egae_reference(r, v, m, f, gamma=0.99, lam=lam, bootstrap=boot)
    torch.testing.assert_close(adv.double(), adv_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ret_ref, atol=2e-5, rtol=1e-5)
    # and it differs from the paper's V(s_l) := V(s_{l-1}) on the truncated rows only
    adv_paper, _ = compute_egae(r, v, m, f, gamma=0.99, lam=lam)
    for b in range(6):
        same = torch.allclose(adv[b], adv_paper[b])
        assert same if (bool(f[b]) or not m[b].any()) else not same
    with pytest.raises(ValueError, match="bootstrap has 2 entries for 6 rows"):
        compute_egae(r, v, m, f, bootstrap=torch.zeros(2))


def test_finished_reward_on_last_token_is_monte_carlo_with_lambda_one():
    g = torch.Generator().manual_seed(0)
    r, v, m, _ = random_case(g, 6, 40)
    f = torch.ones(6, dtype=torch.bool)
    _, ret = compute_egae(r, v, m, f, gamma=0.9, lam=1.0)
    mc = monte_carlo_returns(r, m, gamma=0.9)
    torch.testing.assert_close(ret, mc, atol=1e-5, rtol=1e-5)


def test_long_sequence_stays_finite():
    T = 24576
    r = torch.zeros(2, T)
    r[:, -1] = 1.0
    v = torch.full((2, T), 0.5)
    m = torch.ones(2, T, dtype=torch.bool)
    adv, ret = compute_egae(r, v, m, torch.tensor([True, True]), gamma=1.0, lam=torch.tensor([0.999, 1.0]))
    assert torch.isfinite(adv).all()
    # lam = 1, gamma = 1: return is the final reward everywhere
    torch.testing.assert_close(ret[1], torch.ones(T))


def test_discounted_suffix_sum_against_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, generator=g)
    d = torch.tensor([0.0, 0.5, 1.0])
    out = discounted_suffix_sum(x, d)
    for b in range(3):
        acc = 0.0
        for t in range(199, -1, -1):
            acc = float(x[b, t]) + float(d[b]) * acc
            assert math.isclose(float(out[b, t]), acc, rel_tol=1e-4, abs_tol=1e-4)


def test_adaptive_lambda():
    L = torch.tensor([1.0, 20.0, 100.0, 1000.0, 24576.0])
    lam = adaptive_policy_lambda(L, alpha=0.05, min_lambda=0.95)
    expected = [max(0.95, 1 - 1 / (0.05 * x)) for x in L.tolist()]
    torch.testing.assert_close(lam, torch.tensor(expected))
    lengths = policy_lambda_lengths(torch.tensor([100, 100]), torch.tensor([True, False]), window_tokens=64)
    assert lengths.tolist() == [100.0, 132.0]


def test_shape_errors():
    with pytest.raises(ValueError, match="same"):
        compute_egae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="finished"):
        compute_egae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lam"):
        compute_egae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, dtype=torch.bool),
                     lam=torch.ones(3))

"""megatron_tppo.projection: the per-mode step model, checked against numbers worked by hand."""
import math

import pytest

from megatron_tppo.projection import (StepCosts, expected_max, lognormal_lengths, mean, project)

# lengths 1 or 3 with equal odds; 2 slots; window 2 (PPO: 3)
DIST = [(1, 0.5), (3, 0.5)]


def costs(batch: float, window: int) -> StepCosts:
    # 1 s per decode iteration, one engine, 1 s of training per token, 0.5 s sync
    return StepCosts(t_iter=1.0, running_per_engine=batch, engines=1, train_s=2.0 * window, sync_s=0.5, window=window)


def test_moments_by_hand():
    assert mean(DIST) == 2.0
    assert mean(DIST, lambda l: math.ceil(l / 2)) == 1.5
    assert expected_max(DIST, 2) == pytest.approx(0.25 * 1 + 0.75 * 3)


@pytest.mark.parametrize("batch, expect", [
    # B=1: token-bound; PPO 4 tokens -> 4 iters + 4 s train + 0.5 s sync per 2 finished
    (1.0, {"ppo": 4250.0, "tppo": 4375.0, "tppo_continuous": 4250.0}),
    # B=10: the longest piece binds; PPO waits E[max]=2.5 iterations, T-PPO the window (2)
    (10.0, {"ppo": 3500.0, "tppo": 3875.0, "tppo_continuous": 3250.0}),
])
def test_per_1000_by_hand(batch, expect):
    got = {"ppo": project("ppo", DIST, 2, 3, costs(batch, 3)),
           "tppo": project("tppo", DIST, 2, 2, costs(batch, 2)),
           "tppo_continuous": project("tppo_continuous", DIST, 2, 2, costs(batch, 2))}
    assert got["tppo"].finished_per_step == pytest.approx(4 / 3)
    assert got["tppo"].tokens_per_step == pytest.approx(8 / 3)
    assert got["tppo_continuous"].finished_per_step == pytest.approx(2.0)
    for mode, v in expect.items():
        assert got[mode].s_per_1000 == pytest.approx(v), mode


def test_unknown_mode():
    with pytest.raises(ValueError):
        project("async", DIST, 2, 2, costs(1, 2))


def test_lognormal_lengths():
    d = lognormal_lengths(3072, 1.0, 24576)
    assert sum(p for _, p in d) == pytest.approx(1.0)
    assert max(l for l, _ in d) == 24576 and min(l for l, _ in d) >= 1
    # close to the untruncated lognormal mean (the cap clips ~2% of the mass)
    assert 0.9 * 3072 * math.exp(0.5) < mean(d) < 1.05 * 3072 * math.exp(0.5)


def test_compare_modes_on_32b_recipe():
    from megatron_tppo.config_io import load_config
    from megatron_tppo.projection import compare_modes

    cfg = load_config("examples/qwen2.5_32b/tppo.yaml", [])
    rows = compare_modes(cfg, (4,))
    assert [p.mode for p in rows[0][1]] == ["ppo", "tppo", "tppo_continuous"]
    assert all(p.s_per_1000 > 0 for p in rows[0][1])

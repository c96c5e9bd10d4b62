"""megatron_tppo.planning.projection: the per-mode step model, checked against numbers worked by hand."""
import math
import random

import pytest

from megatron_tppo.algorithms.window_pool import Prompt, WindowPool
from megatron_tppo.planning.projection import (StepCosts, decode_context, expected_max, lognormal_lengths, mean, offsets, piece_ends, project,
                                      response_costs)

# lengths 1 or 3 with equal odds; 2 slots; window 2 (PPO: 3)
DIST = [(1, 0.5), (3, 0.5)]


def costs(batch: float, **kw) -> StepCosts:
    # 1 s per decode iteration, one engine, 0.5 s sync; by default 1 s of policy training per context
    # token, no prompt, a free critic and free prefill
    kw = {"policy_train": (1.0, 0.0), **kw}
    return StepCosts(t_iter=1.0, running_per_engine=batch, engines=1, sync_s=0.5, **kw)


def test_moments_by_hand():
    assert mean(DIST) == 2.0
    assert mean(DIST, lambda l: math.ceil(l / 2)) == 1.5
    assert expected_max(DIST, 2) == pytest.approx(0.25 * 1 + 0.75 * 3)


def test_pieces_by_hand():
    assert piece_ends(3, 2) == [2, 3] and piece_ends(3, 2, 1) == [1, 3] and piece_ends(1, 2, 1) == [1]
    assert piece_ends(4, 2) == [2, 4] and piece_ends(5, 8, 7) == [1, 5]
    assert offsets("tppo", 2) == [0] and offsets("tppo_continuous", 2) == [0, 1]
    assert offsets("tppo_continuous", 64, n=4) == [8, 24, 40, 56]


@pytest.mark.parametrize("batch, expect", [
    # policy seconds per finished response = its pieces' contexts: PPO E[l] = 2; window
    # (1 + (2+3)) / 2 = 3; continuous (1 + ((2+3) + (1+3)) / 2) / 2 = 2.75.
    # B=1: token-bound. PPO 4 tokens -> 4 iterations + 2 x 2 train + 0.5 sync per 2 finished;
    # window 8/3 tokens + 4/3 x 3 + 0.5 per 4/3; continuous 4 + 2 x 2.75 + 0.5 per 2
    (1.0, {"ppo": 4250.0, "tppo": (8 / 3 + 4.5) / (4 / 3) * 1000, "tppo_continuous": 5000.0}),
    # B=10: the longest piece binds; PPO waits E[max] = 2.5 iterations, T-PPO the window (2)
    (10.0, {"ppo": 3500.0, "tppo": 6.5 / (4 / 3) * 1000, "tppo_continuous": 4000.0}),
])
def test_per_1000_by_hand(batch, expect):
    got = {"ppo": project("ppo", DIST, 2, 3, costs(batch)),
           "tppo": project("tppo", DIST, 2, 2, costs(batch)),
           "tppo_continuous": project("tppo_continuous", DIST, 2, 2, costs(batch))}
    assert got["tppo"].finished_per_step == pytest.approx(4 / 3)
    assert got["tppo"].tokens_per_step == pytest.approx(8 / 3)
    assert got["tppo_continuous"].finished_per_step == pytest.approx(2.0)
    for mode, v in expect.items():
        assert got[mode].s_per_1000 == pytest.approx(v), mode


def test_response_costs_by_hand():
    # prompt 1; window 2. l=1: one piece, context 2; l=3: pieces at 2 and 3, contexts 3 and 4
    c = costs(1.0, prompt_tokens=1.0, critic_train=(3.0, 0.0), prefill=(1.0, 0.0))
    pol, cri, pre = response_costs("tppo", DIST, 2, c)
    assert pol == pytest.approx((2 + (3 + 4)) / 2)
    # values (a third of training) on every piece + training on the finished response (3 s/token)
    assert cri == pytest.approx(((2 + 3 * 2) + (3 + 4 + 3 * 4)) / 2)
    # prefill: the prompt before the first piece, prompt + 2 before the second
    assert pre == pytest.approx((1 + (1 + 3)) / 2)
    # attention: a row of context c costs c^2
    pol, _, _ = response_costs("tppo", DIST, 2, costs(1.0, prompt_tokens=1.0, policy_train=(0.0, 1.0)))
    assert pol == pytest.approx((4 + (9 + 16)) / 2)


def _lengths(n: int, cap: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(math.log(cap / 8), 1.0)))) for _ in range(n)]


def _simulate(lengths: list[int], slots: int, window: int, cap: int, prompt: int, continuous: bool) -> dict:
    """Drive the real WindowPool with a plain decode loop (one token per busy slot per iteration);
    returns {sample uid: sum of its segments' context tokens} for the finished samples."""
    prompts = (Prompt(i, [1] * prompt, {}) for i in range(len(lengths)))
    pool = WindowPool(slots, 1, window, cap, prompts)
    ctx, done = {}, {}
    for _ in range(10 * len(lengths)):
        if continuous:
            pool.begin_budget_step()
        pool.refill()
        while True:
            busy = sorted(pool.in_flight().items())
            if not busy or (continuous and pool.budget_left == 0):
                break
            progressed = False
            for slot, s in busy:
                if pool.max_new_tokens(slot) == 0 or (continuous and pool.budget_left == 0):
                    continue
                eos = len(s.response_ids) + 1 == lengths[s.uid]
                pool.append(slot, [7], [0.0], 0, eos=eos)
                progressed = True
                if continuous and s.finished:
                    pool.refill()
            if not progressed:
                break
        batch = pool.end_step()
        for seg in batch.segments:
            ctx[seg.sample_uid] = ctx.get(seg.sample_uid, 0) + len(seg.token_ids)
        for s in batch.finished:
            done[s.uid] = ctx[s.uid]
        if pool.is_drained():
            break
    return done


@pytest.mark.parametrize("mode", ["tppo", "tppo_continuous"])
def test_pieces_match_the_window_pool(mode):
    """The model's piece contexts against the real pool's segments: exact per response with window
    refill; on average with continuous refill (where the offsets are the model's assumption)."""
    cap, window, prompt = 96, 24, 5
    lengths = _lengths(600, cap)
    done = _simulate(lengths, 16, window, cap, prompt, continuous=mode == "tppo_continuous")
    assert len(done) > 500
    c = costs(1.0, prompt_tokens=float(prompt))
    if mode == "tppo":
        for uid, got in done.items():
            assert got == sum(prompt + e for e in piece_ends(lengths[uid], window)), uid
        return
    dist = [(lengths[u], 1 / len(done)) for u in done]
    measured = sum(done.values()) / len(done)
    model = response_costs(mode, dist, window, c)[0]
    window_model = response_costs("tppo", dist, window, c)[0]
    assert abs(measured - model) < 0.03 * model
    assert abs(measured - model) < 0.5 * abs(window_model - model)  # the offsets matter, and are right


def test_decode_context_by_hand():
    # token-weighted: l=1 decodes at context 1; l=3 at 1, 2, 3 -> (1 + 6) / 4 tokens, plus the prompt
    assert decode_context(DIST, 0.0) == pytest.approx(7 / 4)
    assert decode_context(DIST, 10.0) == pytest.approx(10 + 7 / 4)


def test_unknown_mode():
    with pytest.raises(ValueError):
        project("async", DIST, 2, 2, costs(1.0))


def test_lognormal_lengths():
    d = lognormal_lengths(3072, 1.0, 24576)
    assert sum(p for _, p in d) == pytest.approx(1.0)
    assert max(l for l, _ in d) == 24576 and min(l for l, _ in d) >= 1
    # close to the untruncated lognormal mean (the cap clips ~2% of the mass)
    assert 0.9 * 3072 * math.exp(0.5) < mean(d) < 1.05 * 3072 * math.exp(0.5)


def test_compare_modes_on_32b_recipe():
    from megatron_tppo.config_io import load_config
    from megatron_tppo.planning.projection import compare_modes, costs_from_plan

    cfg = load_config("examples/qwen2.5_32b/tppo.yaml", [])
    for resident in (False, True):
        rows = compare_modes(cfg, (4,), resident=resident)
        assert [p.mode for p in rows[0][1]] == ["ppo", "tppo", "tppo_continuous"]
        assert all(p.s_per_1000 > 0 for p in rows[0][1])
    # the decode batch and iteration time do not depend on the window (a token's context does not)
    dist = lognormal_lengths(3072, 1.0, cfg.rollout.max_response_tokens)
    a = costs_from_plan(cfg, 4, dist)
    b = costs_from_plan(cfg, 4, dist, window=cfg.rollout.max_response_tokens)
    assert (a.t_iter, a.running_per_engine) == pytest.approx((b.t_iter, b.running_per_engine))
    assert costs_from_plan(cfg, 4, dist, resident=True).running_per_engine >= a.running_per_engine


def test_shared_trainers_add_up_and_the_swaps_count():
    # window 2, no prompt; policy 1 s per context token, critic training 3 s (its value forward 1 s).
    # Per finished response: policy (1 + (2 + 3)) / 2 = 3; critic values on the pieces (1 | 2 + 3)
    # plus training on the finished response (3 x 1 | 3 x 3): (4 + 14) / 2 = 9. 4/3 finished per step.
    split = project("tppo", DIST, 2, 2, costs(1.0, critic_train=(3.0, 0.0)))
    shared = project("tppo", DIST, 2, 2, costs(1.0, critic_train=(3.0, 0.0), trainers_shared=True, swap_s=0.25))
    assert split.train_s == pytest.approx(4 / 3 * max(3, 9))
    assert shared.train_s == pytest.approx(4 / 3 * (3 + 9))
    # generation 8/3 tokens at B=1 -> 8/3 iterations of 1 s; sync 0.5 s; swaps 0.25 s
    assert shared.step_s == pytest.approx(8 / 3 + 16 + 0.5 + 0.25)
    assert split.swap_s == 0.0

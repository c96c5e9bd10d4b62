"""EGAE and the training batches on the segments of budget steps (rollout.refill=continuous).

Budget steps give segments the window steps never produce: a segment that starts mid-step (a slot
took a new sample when its response ended), several samples' segments from one slot in one step,
segments longer than the window (slots progressing unevenly), truncated segments shorter than the
truncated-tail. The policy batch built from them must equal the per-segment definition (EGAE with
the truncation bootstrap, the length-adaptive lambda, the tail mask, whitening) and the critic
batch must regress each finished response's Monte-Carlo return over all its windows.
"""
from __future__ import annotations

import random

import pytest
import torch

from megatron_tppo.algorithms.tppo_batch import ResponseInput, SegmentInput, critic_batch, policy_batch
from megatron_tppo.algorithms.window_pool import WindowPool
from megatron_tppo.controller.continuous import ContinuousStep, run_in_process
from megatron_tppo.rollout.base import Sampling
from tests.unit.sim_stream import SimStreamEngine
from tests.unit.test_egae import egae_reference
from tests.unit.test_window_pool import SimGenerator, make_prompts

W, L, TAIL = 4, 14, 2


def direct_advantages(segs: list[SegmentInput]) -> list[list[float]]:
    """Per segment, before whitening: EGAE over its tokens, tail of a truncated one zeroed."""
    out = []
    for s in segs:
        n = s.end - s.start
        Lr = s.end if s.finished else s.end + W / 2
        lam = max(0.95, 1 - 1 / (0.05 * Lr))
        r = torch.zeros(1, n)
        if s.finished:
            r[0, -1] = s.reward
        a, _ = egae_reference(r, torch.tensor([s.values]), torch.ones(1, n, dtype=torch.bool),
                              torch.tensor([s.finished]), gamma=1.0, lam=lam)
        k = n if s.finished else max(0, n - TAIL)
        out.append(a[0, :k].tolist() + [None] * (n - k))
    return out


def budget_steps(seed: int, steps: int):
    """Yield (pool, batch, uids in flight when the step began) of budget steps over 2 simulated
    engines with uneven progress."""
    gen = SimGenerator(seed, L)
    pool = WindowPool(num_slots=4, samples_per_prompt=2, window_tokens=W, max_response_tokens=L,
                      prompts=make_prompts(40))
    for step in range(steps):
        engines = [SimStreamEngine(gen, lambda uid: len(pool.sample(uid).prompt_ids), seed=seed * 10 + e,
                                   hiccup=0.4, version=step) for e in range(2)]
        feed = ContinuousStep(pool, 2, Sampling(seed=step), reserve=1)
        at_start = {s.uid for s in pool.in_flight().values()}
        run_in_process(feed, engines)
        batch = pool.end_step()
        rng = random.Random(seed * 100 + step)
        for seg in batch.segments:
            pool.set_values(seg.sample_uid, seg.start, [rng.uniform(-1, 1) for _ in range(seg.start, seg.end)])
        for s in batch.finished:
            pool.set_reward(s.uid, float(rng.random() < 0.5))
        yield pool, batch, at_start


def test_policy_and_critic_batches_of_budget_steps():
    # mid_step_start: a sample that took a slot freed during the step, so that slot holds two
    # responses' segments in this step (the ended one's and the new one's)
    seen = {"mid_step_start": 0, "longer_than_window": 0, "shorter_than_tail": 0, "finished": 0}
    for seed in range(3):
        for pool, batch, at_start in budget_steps(seed, steps=8):
            check_step(pool, batch, at_start, seen)
    assert all(v > 0 for v in seen.values()), seen  # the cases above really occurred


def check_step(pool, batch, at_start, seen) -> None:
    """The policy and critic batches of one step against their per-segment definitions."""
    segs = []
    for seg in batch.segments:
        s = pool.sample(seg.sample_uid)
        segs.append(SegmentInput(seg.token_ids, seg.prompt_len, seg.start, seg.end, seg.logprobs,
                                 s.values[seg.start:seg.end], seg.finished, s.reward or 0.0))
        seen["mid_step_start"] += seg.sample_uid not in at_start
        seen["longer_than_window"] += seg.end - seg.start > W
        seen["shorter_than_tail"] += not seg.finished and seg.end - seg.start <= TAIL
        seen["finished"] += seg.finished
    if not segs:
        return
    b = policy_batch(segs, window_tokens=W, tail_ignore=TAIL, advantage_clamp=0.0)
    raw = direct_advantages(segs)
    kept = [a for row in raw for a in row if a is not None]
    if len(kept) < 2:
        return
    mean = sum(kept) / len(kept)
    std = (sum((x - mean) ** 2 for x in kept) / len(kept)) ** 0.5
    for i, (s, row) in enumerate(zip(segs, raw)):
        pos = list(range(s.prompt_len + s.start, s.prompt_len + s.end))
        assert torch.nonzero(b["loss_mask"][i]).flatten().tolist() == pos
        assert b["old_logprobs"][i, pos].tolist() == pytest.approx(s.logprobs)
        want = [0.0 if a is None else (a - mean) / max(std, 1e-8) for a in row]
        assert b["advantages"][i, pos].tolist() == pytest.approx(want, abs=1e-4)
    if batch.finished:  # the critic: whole responses, every window's stored values
        resp = [ResponseInput(s.prompt_ids + s.response_ids, len(s.prompt_ids), list(s.values), s.reward)
                for s in batch.finished]
        c = critic_batch(resp)
        for i, s in enumerate(batch.finished):
            pos = range(len(s.prompt_ids), len(s.prompt_ids) + len(s.response_ids))
            assert c["returns"][i, list(pos)].tolist() == pytest.approx([s.reward] * len(pos), abs=1e-5)
            assert c["old_values"][i, list(pos)].tolist() == pytest.approx(s.values)

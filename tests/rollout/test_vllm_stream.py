"""Continuous refill on a real vLLM engine (VLLMEngine.stream, rollout/vllm_stream.py), CPU.

Covers: the budget is met exactly and never exceeded; a slot whose request ends takes the next
queued request within the same call and no slot idles (tokens == slots x iterations); partial
(truncated) tokens come back with the log-probs vLLM itself gives those tokens (prompt_logprobs);
a stream spans several calls (expect_more); greedy continuous refill gives the same responses as
window refill and as one uninterrupted generation; errors leave the engine usable.

The session's tiny random model almost never samples its EOS, so these tests make frequent
tokens stop tokens (``engine.stop_token_ids``, restored after each test).
"""
from __future__ import annotations

import pytest

from megatron_tppo.algorithms.window_pool import Prompt, WindowPool
from megatron_tppo.controller.continuous import ContinuousStep, run_in_process
from megatron_tppo.rollout import Sampling
from megatron_tppo.rollout.stream import StreamRequest, StreamResult, StreamStart

T1 = Sampling(temperature=1.0)
GREEDY = Sampling(temperature=0.0)
PROMPTS = [[5 + i, 17 + 3 * i, 42, 3 + (7 * i) % 50] for i in range(24)]


@pytest.fixture
def frequent_stops(engine, monkeypatch):
    monkeypatch.setattr(engine, "stop_token_ids", list(range(0, 300, 6)))  # about 1 token in 6 stops
    return set(engine.stop_token_ids)


def check_logprobs(engine, prompt_of: dict, results: list[StreamResult], atol: float = 1e-4) -> None:
    """Every result's log-probs equal vLLM's prompt log-probs of the same tokens (T=1: the policy's)."""
    rows = [r for r in results if r.token_ids]
    scored = engine.prompt_logprobs([prompt_of[r.key] + r.token_ids for r in rows])
    for r, lp in zip(rows, scored):
        assert len(r.logprobs) == len(r.token_ids)
        assert r.logprobs == pytest.approx(lp[-len(r.token_ids):], abs=atol), r.key


def test_budget_refill_at_once_and_partial_logprobs(engine, frequent_stops):
    slots, budget = 4, 40
    prompt_of = {k: PROMPTS[k] for k in range(14)}
    reqs = [StreamRequest(k, PROMPTS[k], 30, seed=100 + k, slot=k if k < slots else None) for k in range(14)]
    upd = engine.stream(reqs, budget, T1, expect_more=False)
    assert upd.closed and upd.tokens == budget  # enough work: the budget, exactly
    # no slot idled: every iteration, every slot produced a token (refills joined the next iteration)
    assert upd.tokens == slots * upd.iterations
    results = [e for e in upd.events if isinstance(e, StreamResult)]
    starts = [e for e in upd.events if isinstance(e, StreamStart)]
    assert starts, "no slot was refilled"
    assert sum(len(r.token_ids) for r in results) == budget
    for st in starts:  # refilled in the slot its predecessor left, after it ended, within this call
        i = upd.events.index(st)
        before = [e for e in upd.events[:i] if e.slot == st.slot]
        assert isinstance(before[-1], StreamResult) and before[-1].finish_reason in ("stop", "length")
        assert any(isinstance(e, StreamResult) and e.key == st.key for e in upd.events[i:])
    for r in results:
        stopped = [t for t in r.token_ids if t in frequent_stops]
        if r.finish_reason == "stop":
            assert stopped == [r.token_ids[-1]]
        else:
            assert not stopped and r.finish_reason == "truncated" and len(r.token_ids) < 30
    truncated = [r for r in results if r.finish_reason == "truncated"]
    assert len(truncated) == slots  # what was in flight at the budget
    assert sorted(upd.unstarted) == sorted(set(range(slots, 14)) - {s.key for s in starts})
    check_logprobs(engine, prompt_of, results)
    # the stream closed: the engine is free for ordinary generation again
    assert len(engine.generate([PROMPTS[0]], 3, GREEDY)[0].token_ids) >= 1


def test_stream_spans_calls_and_continues_requests(engine, frequent_stops):
    """expect_more: the call returns when a slot frees with nothing queued; the next call's
    request starts in that slot; running requests keep their tokens across calls."""
    prompt_of = {k: PROMPTS[k] for k in range(3)}
    first = [StreamRequest(0, PROMPTS[0], 2, seed=1, slot=0), StreamRequest(1, PROMPTS[1], 60, seed=2, slot=1)]
    engine.stop_token_ids = []  # only max_tokens ends these requests (the fixture restores the stops)
    a = engine.stream(first, 20, T1, expect_more=True)
    assert not a.closed and a.tokens == 4 and a.iterations == 2  # key 0 ended after 2 tokens
    assert [(type(e).__name__, e.key) for e in a.events] == [("StreamResult", 0)]
    assert a.events[0].finish_reason == "length" and len(a.events[0].token_ids) == 2
    b = engine.stream([StreamRequest(2, PROMPTS[2], 60, seed=3)], 20 - a.tokens, T1, expect_more=False)
    assert b.closed and a.tokens + b.tokens == 20
    assert [(type(e).__name__, e.key, e.slot) for e in b.events] == [
        ("StreamStart", 2, 0), ("StreamResult", 2, 0), ("StreamResult", 1, 1)]
    r1 = b.events[2]
    assert r1.finish_reason == "truncated" and len(r1.token_ids) == 10  # 2 in the first call, 8 in the second
    check_logprobs(engine, prompt_of, [a.events[0], b.events[1], r1])


def test_budget_smaller_than_the_running_requests_is_not_exceeded(engine, frequent_stops):
    reqs = [StreamRequest(k, PROMPTS[k], 30, seed=k, slot=k) for k in range(5)]
    upd = engine.stream(reqs, 7, T1, expect_more=False)
    assert upd.closed and upd.tokens <= 7
    assert sum(len(e.token_ids) for e in upd.events if isinstance(e, StreamResult)) == upd.tokens
    zero = engine.stream([StreamRequest(9, PROMPTS[9], 30, slot=0)], 0, T1)
    assert zero.closed and zero.tokens == 0 and [e.finish_reason for e in zero.events] == ["truncated"]


def test_errors_leave_the_engine_usable(engine):
    ok = StreamRequest(0, PROMPTS[0], 5, slot=0)
    with pytest.raises(ValueError, match="key 0 is already"):
        engine.stream([ok, StreamRequest(0, PROMPTS[1], 5, slot=1)], 10, T1)
    with pytest.raises(ValueError, match="slot 0 is busy"):
        engine.stream([ok, StreamRequest(1, PROMPTS[1], 5, slot=0)], 10, T1)
    with pytest.raises(ValueError, match="no slot"):
        engine.stream([StreamRequest(1, PROMPTS[1], 5)], 10, T1)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    upd = engine.stream([ok], 10, GREEDY, expect_more=False)
    assert upd.closed and upd.tokens == 5


def greedy_stops(engine, L: int) -> list[int]:
    """Tokens at which the random model's greedy chains change: as stop tokens they end some
    responses early, at different lengths (greedy chains of this model repeat one token)."""
    outs = engine.generate(PROMPTS, L, GREEDY)
    return sorted({t for o in outs for t in o.token_ids if t != o.token_ids[0]} - {o.token_ids[0] for o in outs})


def test_greedy_continuous_equals_window_refill_and_one_generation(engine, monkeypatch):
    L, W, slots, spp, steps = 24, 6, 4, 2, 6
    monkeypatch.setattr(engine, "stop_token_ids", greedy_stops(engine, L))
    assert engine.stop_token_ids, "the greedy chains never change: no early stops to test with"

    def new_pool():
        return WindowPool(slots, spp, W, L, [Prompt(i, p) for i, p in enumerate(PROMPTS)])

    window, cont = new_pool(), new_pool()
    seen = {"window": {}, "continuous": {}}  # uid -> (response, finished)
    utilization = []
    for _ in range(steps):
        window.refill()
        reqs = window.requests()
        res = engine.generate([q.token_ids for q in reqs], [q.max_new_tokens for q in reqs], GREEDY)
        for q, r in zip(reqs, res):
            window.append(q.slot, r.token_ids, r.logprobs, r.policy_version, eos=r.finish_reason == "stop")
        finished_w = window.end_step().finished
        utilization.append(run_in_process(ContinuousStep(cont, 1, GREEDY), [engine])["utilization"])
        finished_c = cont.end_step().finished
        for mode, fin in (("window", finished_w), ("continuous", finished_c)):
            seen[mode].update({s.uid: (list(s.response_ids), True) for s in fin})
    for mode, pool in (("window", window), ("continuous", cont)):
        seen[mode].update({s.uid: (list(s.response_ids), False) for s in pool.in_flight().values()})
    assert min(utilization) == 1.0  # one engine in lockstep: no slot ever idled
    assert len(seen["continuous"]) > len(seen["window"])  # the refilled slots took more samples
    truth = {uid: engine.generate([PROMPTS[uid // spp]], L, GREEDY)[0].token_ids
             for uid in set(seen["window"]) | set(seen["continuous"])}
    both = set(seen["window"]) & set(seen["continuous"])
    assert both
    for mode, got in seen.items():
        for uid, (ids, finished) in got.items():
            # finished: the whole greedy response; in flight: a prefix of it, resumed from token ids
            assert (ids == truth[uid]) if finished else (truth[uid][:len(ids)] == ids), (mode, uid)
    for uid in both:  # where both modes finished a sample they agree token for token
        (a, fa), (b, fb) = seen["window"][uid], seen["continuous"][uid]
        n = min(len(a), len(b))
        assert a[:n] == b[:n] and (not (fa and fb) or a == b), uid

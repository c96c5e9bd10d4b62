"""Rewards: boxed math answers, the registry, and the timeout/exception wrapper."""
from __future__ import annotations

import time

import pytest

from megatron_tppo.rewards import REWARDS, SafeReward, get_reward, make_safe_reward, math_reward
from megatron_tppo.rewards.math import last_boxed, normalize


def hang(text: str, meta: dict) -> float:
    time.sleep(60)
    return 1.0


def boom(text: str, meta: dict) -> float:
    raise RuntimeError("reward exploded")


def nan(text: str, meta: dict) -> float:
    return float("nan")


def echo(text: str, meta: dict) -> float:
    return float(text == meta["answer"])


@pytest.mark.parametrize("response,answer,score", [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac12}", "1/2", 1.0),
    ("first \\boxed{3} then finally \\boxed{42}", 42, 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{ 5.0 }", "\\boxed{5}", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("the answer is 42", "42", 0.0),  # no \boxed: not an answer
    ("\\boxed{}", "42", 0.0),
    ("\\boxed{42", "42", 0.0),  # never closed
])
def test_math_reward(response, answer, score):
    assert math_reward(response, {"answer": answer}) == score


def test_last_boxed_and_normalize():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("nothing") is None
    assert normalize("$x = 5.50$") == "5.5"
    assert normalize("\\left( 1, 2 \\right)") == "(1,2)"


def test_registry():
    assert set(REWARDS) == {"arith", "math"}
    assert get_reward("arith")("#07", {"answer": 7}) == 1.0
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_thread_wrapper_times_out_and_catches():
    safe = SafeReward(hang, timeout_s=0.2, mode="thread")
    t = time.monotonic()
    res = safe("x", {})
    assert time.monotonic() - t < 5
    assert (res.score, res.status) == (0.0, "timeout") and safe.leaked_threads == 1
    safe = SafeReward(boom, timeout_s=1, mode="thread")
    res = safe("x", {})
    assert (res.score, res.status) == (0.0, "error") and "reward exploded" in res.reason
    scores, counts = SafeReward(echo, 1, mode="thread").score_batch(["a", "b"], [{"answer": "a"}, {"answer": "a"}])
    assert scores == [1.0, 0.0] and counts["ok"] == 2


def test_process_wrapper_kills_a_hang_and_goes_on():
    with SafeReward(hang, timeout_s=0.5, mode="process") as safe:
        t = time.monotonic()
        res = safe("x", {})
        assert time.monotonic() - t < 10  # the 60 s sleep was cut off
        assert (res.score, res.status) == (0.0, "timeout")
        assert safe._proc is None  # the hung worker is gone
    with SafeReward(boom, timeout_s=5, mode="process") as safe:
        scores, counts = safe.score_batch(["x", "y"], [{}, {}])
        assert scores == [0.0, 0.0] and counts["error"] == 2 and "RuntimeError: reward exploded" in counts["reasons"][0]
        assert safe.counts["error"] == 2


def test_process_wrapper_runs_registered_rewards():
    texts = ["\\boxed{0.5}", "\\boxed{2}", "no box"]
    metas = [{"answer": "\\frac{1}{2}"}, {"answer": "3"}, {"answer": "1"}]
    with make_safe_reward("math", timeout_s=30) as safe:
        scores, counts = safe.score_batch(texts, metas)
        assert scores == [1.0, 0.0, 0.0]
        assert {k: counts[k] for k in ("ok", "error", "timeout")} == {"ok": 3, "error": 0, "timeout": 0}
    with SafeReward(nan, timeout_s=5, mode="thread") as safe:
        assert safe("x", {}).status == "error"

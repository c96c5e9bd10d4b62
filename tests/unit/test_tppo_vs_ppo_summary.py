"""benchmarks/tppo_vs_ppo.summarize: training clock = sum of step seconds (evaluation excluded);
finished responses and generated tokens to the target = their sums up to the step of the first
evaluation at or above it."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from tppo_vs_ppo import summarize  # noqa: E402


def test_summarize_by_hand():
    cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=64, refill="window"))
    tags = {"perf/step_s": {1: 10.0, 2: 10.0, 3: 20.0},
            "perf/generate_s": {1: 2.0, 2: 2.0, 3: 4.0}, "perf/train_s": {1: 7.0, 2: 7.0, 3: 14.0},
            "perf/values_s": {1: 1.0, 2: 1.0, 3: 2.0}, "perf/weight_sync_s": {2: 0.0, 3: 0.0},
            "rollout/generated_tokens": {1: 100.0, 2: 100.0, 3: 200.0},
            "rollout/slot_utilization": {1: 0.5, 2: 0.5, 3: 1.0},
            "rollout/finished_count": {1: 2.0, 2: 3.0, 3: 5.0},
            "eval/accuracy": {0: 0.40, 2: 0.44, 3: 0.46}, "perf/eval_s": {0: 5.0, 2: 5.0, 3: 5.0}}
    s = summarize("tppo", cfg, tags, wall_s=99.0, target_delta=0.05)
    assert s["accuracy_curve"] == [(0.0, 0.40), (20.0, 0.44), (40.0, 0.46)]
    assert s["time_to_target_s"] == 40.0 and s["best_accuracy"] == 0.46
    assert s["train_s"] == 40.0 and s["eval_s"] == 15.0
    assert s["phase_share"]["train"] == 0.7 and s["generated_tokens_per_s"] == 10.0
    assert abs(s["slot_utilization"] - 2 / 3) < 1e-12
    # 10 finished in 40 training s, 8 of them generating
    assert s["step_s_per_1000_finished"] == 4000.0 and s["generate_s_per_1000_finished"] == 800.0
    tags["eval/accuracy"] = {0: 0.40, 3: 0.42}
    assert summarize("tppo", cfg, tags, 99.0, 0.05)["time_to_target_s"] is None


def _to_target_by_hand(tags, delta):
    """The plain loop: the first evaluation (in step order) at or above start + delta, then the
    finished responses and generated tokens of every training step up to and including its step."""
    evals = sorted(tags["eval/accuracy"].items())
    for step, a in evals:
        if a >= evals[0][1] + delta:
            resp = tok = 0.0
            for s in sorted(tags["perf/step_s"]):
                if s <= step:
                    resp += tags["rollout/finished_count"].get(s, 0.0)
                    tok += tags["rollout/generated_tokens"].get(s, 0.0)
            return resp, tok
    return None, None


def _tags(acc):
    steps = range(1, 7)
    return {"perf/step_s": {s: 5.0 + s for s in steps},
            "rollout/finished_count": {s: 2.0 + s for s in steps},  # 3, 4, 5, 6, 7, 8
            "rollout/generated_tokens": {s: 90.0 + 10 * s for s in steps},  # 100, 110, ..., 150
            "eval/accuracy": acc}


def test_responses_and_tokens_to_target_by_hand():
    cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=64, refill="window"))
    # the target (0.45) is first reached at the 2nd evaluation (step 2), again at step 6 (the best)
    tags = _tags({0: 0.40, 2: 0.46, 4: 0.43, 6: 0.50})
    s = summarize("tppo", cfg, tags, wall_s=1.0, target_delta=0.05)
    assert (s["responses_to_target"], s["tokens_to_target"]) == _to_target_by_hand(tags, 0.05) == (7.0, 210.0)
    assert s["time_to_target_s"] == 6.0 + 7.0
    assert s["accuracy_by_responses"] == [(0.0, 0.40), (7.0, 0.46), (18.0, 0.43), (33.0, 0.50)]
    assert [v for _, v in s["accuracy_by_responses"]] == [v for _, v in s["accuracy_curve"]]
    assert s["finished_responses"] == 33.0 and s["generated_tokens"] == 750.0
    # never reached: all three null, the curve still there
    tags = _tags({0: 0.40, 3: 0.44, 6: 0.449})
    s = summarize("ppo", cfg, tags, 1.0, 0.05)
    assert _to_target_by_hand(tags, 0.05) == (None, None)
    assert s["responses_to_target"] is None and s["tokens_to_target"] is None and s["time_to_target_s"] is None
    assert s["accuracy_by_responses"] == [(0.0, 0.40), (12.0, 0.44), (33.0, 0.449)]


def test_first_fixture_to_target():
    # test_summarize_by_hand's tags: the target is reached at step 3, the last one
    cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=64, refill="window"))
    tags = {"perf/step_s": {1: 10.0, 2: 10.0, 3: 20.0}, "rollout/generated_tokens": {1: 100.0, 2: 100.0, 3: 200.0},
            "rollout/finished_count": {1: 2.0, 2: 3.0, 3: 5.0}, "eval/accuracy": {0: 0.40, 2: 0.44, 3: 0.46}}
    s = summarize("tppo", cfg, tags, 99.0, 0.05)
    assert (s["responses_to_target"], s["tokens_to_target"]) == _to_target_by_hand(tags, 0.05) == (10.0, 400.0)
    assert s["accuracy_by_responses"] == [(0.0, 0.40), (5.0, 0.44), (10.0, 0.46)]

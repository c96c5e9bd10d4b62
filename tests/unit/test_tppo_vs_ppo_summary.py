"""benchmarks/tppo_vs_ppo.summarize: training clock = sum of step seconds (evaluation excluded)."""
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

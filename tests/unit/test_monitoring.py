"""TensorBoard logger: what is logged reads back with TensorBoard's own EventAccumulator."""
import math

import torch

from megatron_tppo.monitoring import MetricsLogger, NullLogger, read_scalars, summary_line


def test_scalars_round_trip(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(0, {"train/reward_mean": 0.25, "perf/generate_s": torch.tensor(1.5), "policy/loss": float("nan")})
    log.log(1, {"train/reward_mean": 0.5, "ignored/not_a_number": "text"})
    log.close()
    got = read_scalars(tmp_path / "tensorboard")
    assert got["train/reward_mean"] == [(0, 0.25), (1, 0.5)]
    assert got["perf/generate_s"] == [(0, 1.5)]
    assert math.isnan(got["policy/loss"][0][1])
    assert got["health/nonfinite_metrics"] == [(0, 1.0)]
    assert "ignored/not_a_number" not in got


def test_summary_line_and_null_logger(tmp_path):
    line = summary_line(3, {"train/reward_mean": 0.41234, "rollout/finished_count": 37, "other": 1})
    assert line == "step 3 | reward 0.412 | fin 37"
    NullLogger().log(0, {"a": 1})
    disabled = MetricsLogger(tmp_path, enabled=False)
    disabled.log(0, {"a": 1})
    assert not (tmp_path / "tensorboard").exists()

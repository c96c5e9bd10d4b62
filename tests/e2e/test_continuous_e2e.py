"""End to end with ``rollout.refill=continuous``: the T-PPO loop on a real Ray cluster, megatron-core
and vLLM, a few steps on the tiny random model (tests/e2e/conftest.py's SMALL settings: 8 slots,
windows of 12, responses of at most 30 tokens), TensorBoard read back.

Checks: every step generates exactly its budget (8 x 12 tokens: the prompt stream never runs dry)
with no idle slot (one engine in lockstep: utilization 1.0); responses end at the length cap and
their slots take new samples inside the step; trainer and rollout agree on the log-probs of
tokens generated before and after a refill; every prompt is accounted for; and 2 steps +
checkpoint + resume reach the same metrics as 4 straight steps; with two engines the budget holds over both.
"""
import pytest

from megatron_tppo.monitoring import read_scalars
from tests.e2e.conftest import RESUME_COMMON, run_tiny
from tests.e2e.test_faults import assert_prompts_accounted, assert_same_metrics

pytestmark = pytest.mark.slow
CONTINUOUS = ["rollout.refill=continuous"]


def test_e2e_continuous_refill(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, CONTINUOUS)
    budget = cfg.rollout.num_slots * cfg.rollout.window_tokens
    assert [v for _, v in tb["rollout/generated_tokens"]] == [budget] * 3
    assert [v for _, v in tb["rollout/slot_utilization"]] == [1.0] * 3
    assert max(v for _, v in tb["rollout/logprob_mismatch_max"]) < 1e-4
    # step 3: responses hit the 30-token cap after 6 tokens; their slots started new samples at
    # once, so the step holds more segments than slots
    assert tb["rollout/finished_count"][-1][1] > 0
    assert tb["rollout/active_slots"][-1][1] > cfg.rollout.num_slots
    assert_prompts_accounted(tmp_path, tb, cfg.rollout.samples_per_prompt)


def test_e2e_continuous_resume_reaches_the_same_metrics(ray_cluster, tiny_model, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    _, straight = run_tiny(straight_dir, tiny_model, CONTINUOUS + RESUME_COMMON)
    run_tiny(resumed_dir, tiny_model, CONTINUOUS + RESUME_COMMON + ["steps=2", "checkpoint.keep_last=1"])
    assert (resumed_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    run_tiny(resumed_dir, tiny_model, CONTINUOUS + RESUME_COMMON + ["checkpoint.keep_last=1", "checkpoint.resume=true"])
    # (window refill's resume against a straight run: test_faults.py, after SIGTERM and after kill -9)
    assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["step_00000004"]  # keep_last=1
    resumed = read_scalars(resumed_dir / "tensorboard")
    assert_same_metrics(straight, resumed, (3, 4))
    assert dict(resumed["rollout/slot_utilization"])[4] == dict(straight["rollout/slot_utilization"])[4]


def test_e2e_continuous_refill_two_engines(ray_cluster, tiny_model, tmp_path):
    """Two engines, 4 slots and 48 tokens of budget each: the step's budget holds over both."""
    cfg, tb = run_tiny(tmp_path, tiny_model, CONTINUOUS + ["rollout.num_engines=2"])
    budget = cfg.rollout.num_slots * cfg.rollout.window_tokens
    assert [v for _, v in tb["rollout/generated_tokens"]] == [budget] * 3
    assert min(v for _, v in tb["rollout/slot_utilization"]) == 1.0
    assert max(v for _, v in tb["rollout/logprob_mismatch_max"]) < 1e-4
    assert_prompts_accounted(tmp_path, tb, cfg.rollout.samples_per_prompt)

"""End to end: the T-PPO loop on a real Ray cluster, megatron-core (TP=2 / PP=2 over gloo) and
vLLM, for a few steps on a tiny random model; TensorBoard read back.

Learning itself is shown by `make run` (the SFT model, 40 steps); this test checks that every
component runs together, that the metrics exist, that trainer and rollout agree on log-probs,
and that every prompt taken from the stream is accounted for. Resume and faults: test_faults.py.
"""
import json
from pathlib import Path

import pytest

from megatron_tppo.planning.schedule import run_phases
from tests.e2e.conftest import check_memory_trace, run_tiny, saves_of

REQUIRED_TAGS = [
    "train/reward_mean", "eval/accuracy", "eval/accuracy_se", "rollout/response_length_mean", "rollout/finished_count",
    "rollout/truncated_count", "policy/clip_fraction", "critic/value_loss", "critic/explained_variance",
    "perf/generate_s", "perf/train_s", "perf/weight_sync_s", "perf/generated_tokens_per_s",
    "rollout/logprob_mismatch_max", "policy/entropy", "policy/grad_norm", "critic/grad_norm", "policy/lr",
    "rollout/windows_per_finished", "perf/values_s", "rollout/slot_utilization",
]


def check_run(cfg, tb):
    missing = [t for t in REQUIRED_TAGS if t not in tb]
    assert not missing, f"TensorBoard tags missing: {missing}"
    # the engines started from dummy weights (the run syncs the policy in before step 1) ...
    actors = json.loads((Path(cfg.logging.output_dir) / "actors.json").read_text())
    assert {a["weights"] for a in actors if a["group"] == "rollout engine"} == {"dummy"}
    # ... and, fp32, vLLM (synced after every update) and megatron agree on the sampled tokens from
    # step 1 on (dummy weights left anywhere would be off by > 0.1: tests/rollout/test_vllm_tp2.py)
    assert max(v for _, v in tb["rollout/logprob_mismatch_max"]) < 1e-4
    steps = [s for s, _ in tb["rollout/finished_count"]]
    assert steps == [1, 2, 3]
    # every prompt taken is finished, in flight, or pending (no dynamic sampling here)
    n = cfg.rollout.samples_per_prompt
    taken = tb["rollout/prompts_taken"][-1][1]
    finished = sum(v for _, v in tb["rollout/finished_count"])
    in_flight, pending = tb["rollout/in_flight"][-1][1], tb["rollout/pending"][-1][1]
    assert taken * n == finished + in_flight + pending
    assert finished > 0  # max 30 tokens in windows of 12: everything ends by the third window
    assert max(v for _, v in tb["rollout/windows_per_finished"]) <= cfg.max_windows
    # the counters of skipped/failed items are on every step, so a user sees them at zero too
    for tag in ("health/reward_error", "health/reward_timeout", "health/bad_rows", "health/nonfinite_updates",
                "rollout/filtered_groups", "rollout/length_capped"):
        assert [s for s, _ in tb[tag]] == [1, 2, 3], tag


@pytest.mark.slow
def test_e2e_policy_tp2_critic_pp2(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["parallel.policy.tensor_parallel=2", "parallel.critic.pipeline_parallel=2"])
    check_run(cfg, tb)


@pytest.mark.slow
def test_e2e_policy_pp2(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["parallel.policy.pipeline_parallel=2"])
    check_run(cfg, tb)
    # the memory schedule, call for call: start-up, a critic warm-up step, two steps, the final save
    steps = range(cfg.steps)
    check_memory_trace(cfg, tmp_path, [run_phases(steps, cfg.algorithm.critic_warmup_steps, saves_of(cfg, steps))])


@pytest.mark.slow
def test_time_budget_ends_the_run_like_a_last_step(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["steps=50", "time_budget_s=0.01", "data.eval_every=10"])
    assert [s for s, _ in tb["rollout/finished_count"]] == [1]
    assert [s for s, _ in tb["eval/accuracy"]] == [0, 1]  # start, and the last step's evaluation
    assert (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE").is_file()

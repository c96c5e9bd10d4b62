"""End to end: at a sampling temperature other than 1 the trainer's log-probs are those of the
distribution vLLM sampled from (logits / T), so the PPO ratio is 1 on-policy.

vLLM's ``processed_logprobs`` are log_softmax(logits / T) (vllm/v1/sample/sampler.py); a trainer
that scored raw logits measured ``rollout/logprob_mismatch_max`` 0.74 here at T = 0.7 (1.12 on
the full tiny default). Step 1 runs on the weights vLLM generated with (synced before it), so its
mismatch is numerical only: fp32 on both sides, below 1e-4.
"""
import pytest

from tests.e2e.conftest import run_tiny


@pytest.mark.slow
def test_step1_logprob_mismatch_at_temperature_07(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["rollout.temperature=0.7", "steps=1", "algorithm.critic_warmup_steps=0",
                                              "data.eval_every=0", "logging.rollout_dump=false"])
    assert cfg.rollout.logprobs_mode == "processed"
    (step, worst), = tb["rollout/logprob_mismatch_max"]
    assert step == 1
    assert worst < 1e-4, f"train vs rollout log-prob mismatch {worst} at T=0.7"
    assert tb["rollout/logprob_mismatch_mean"][0][1] < 1e-5

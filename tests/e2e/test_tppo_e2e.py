"""End to end: the T-PPO loop on a real Ray cluster, megatron-core (TP=2 / PP=2 over gloo) and
vLLM, for a few steps on a tiny random model; TensorBoard read back.

Learning itself is shown by `make run` (the SFT model, 40 steps); this test checks that every
component runs together, that the metrics exist, that trainer and rollout agree on log-probs,
and that every prompt taken from the stream is accounted for.
"""
import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.monitoring import read_scalars

REQUIRED_TAGS = [
    "train/reward_mean", "eval/accuracy", "rollout/response_length_mean", "rollout/finished_count",
    "rollout/truncated_count", "policy/clip_fraction", "critic/value_loss", "critic/explained_variance",
    "perf/generate_s", "perf/train_s", "perf/weight_sync_s", "perf/generated_tokens_per_s",
    "rollout/logprob_mismatch_max", "policy/entropy", "policy/grad_norm", "critic/grad_norm", "policy/lr",
    "rollout/windows_per_finished", "perf/values_s", "rollout/slot_utilization",
]
MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.max_position_embeddings=128"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_tppo.data.tokenizer import save_tokenizer
    from megatron_tppo.weights.hf_config import save_random_hf_model

    path = tmp_path_factory.mktemp("model")
    save_random_hf_model(load_config("examples/tiny_cpu.yaml", MODEL).model, path, seed=0)
    save_tokenizer(path)
    return path


def run_tiny(tmp_path, model_dir, extra):
    from megatron_tppo.train import run

    cfg = load_config("examples/tiny_cpu.yaml", MODEL + [
        f"model.hf_path={model_dir}", "steps=3", "rollout.num_slots=8", "rollout.samples_per_prompt=4",
        "rollout.window_tokens=12", "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2",
        "algorithm.critic_warmup_steps=1", "data.eval_prompts=4", "data.eval_every=3",
        "data.eval_samples_per_prompt=2", "logging.progress_bar=false", f"logging.output_dir={tmp_path}"] + extra)
    run(cfg)
    return cfg, read_scalars(tmp_path / "tensorboard")


def check_run(cfg, tb):
    missing = [t for t in REQUIRED_TAGS if t not in tb]
    assert not missing, f"TensorBoard tags missing: {missing}"
    # fp32: vLLM (synced after every update) and megatron agree on the sampled tokens
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


@pytest.mark.slow
def test_e2e_policy_tp2_critic_pp2(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["parallel.policy.tensor_parallel=2", "parallel.critic.pipeline_parallel=2"])
    check_run(cfg, tb)


@pytest.mark.slow
def test_e2e_policy_pp2(ray_cluster, tiny_model, tmp_path):
    cfg, tb = run_tiny(tmp_path, tiny_model, ["parallel.policy.pipeline_parallel=2"])
    check_run(cfg, tb)


RESUME_TAGS = ["policy/loss", "policy/grad_norm", "critic/value_loss", "rollout/generated_tokens",
               "rollout/response_length_mean", "rollout/logprob_mismatch_mean", "rollout/prompts_taken"]


@pytest.mark.slow
def test_resume_reaches_the_same_metrics(ray_cluster, tiny_model, tmp_path):
    """4 steps straight vs 2 steps + checkpoint + resume to 4: the same metrics (rel. 1e-4)."""
    common = ["data.eval_every=0", "checkpoint.keep_last=1"]
    _, straight = run_tiny(tmp_path / "a", tiny_model, common + ["steps=4"])
    run_tiny(tmp_path / "b", tiny_model, common + ["steps=2"])
    assert (tmp_path / "b" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    _, resumed = run_tiny(tmp_path / "b", tiny_model, common + ["steps=4", "checkpoint.resume=true"])
    for tag in RESUME_TAGS:
        want = dict(straight[tag])
        got = dict(resumed[tag])  # the event files of both halves
        for step in (3, 4):
            if step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (tag, step)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000004"]

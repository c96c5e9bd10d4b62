"""The smoke test's checks and report, from scalars and logs made by hand (no run)."""
import pytest
import torch

from megatron_tppo import smoke

FP32_CHECK = "train-vs-rollout log-prob mismatch max < 0.001 (fp32)"


def _good(tmp_path):
    steps = [1, 2, 3]
    scalars = {t: [(s, 0.1) for s in steps] for t in smoke.REQUIRED_TAGS}
    scalars["rollout/logprob_mismatch_max"] = [(1, 2e-6), (2, 5e-6), (3, 4e-6)]
    scalars["rollout/logprob_mismatch_mean"] = [(1, 3e-7), (2, 6e-7), (3, 5e-7)]
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    logs = ("...", f"[tppo] resumed from {ckpt} at step 2\n")
    return scalars, logs


def test_all_pass(tmp_path):
    scalars, logs = _good(tmp_path)
    checks = smoke.evaluate(scalars, tmp_path, (0, 0), logs)
    assert [c.ok for c in checks] == [True] * 7, checks
    text = smoke.report(checks, "in 60 s")
    assert text.startswith("T-PPO smoke test: PASS (7/7) in 60 s") and text.count("[PASS]") == 7
    assert f"{FP32_CHECK}: max 5e-06 over steps [1, 2, 3]" in text


def test_each_failure_is_named(tmp_path):
    scalars, logs = _good(tmp_path)
    scalars["rollout/logprob_mismatch_max"][1] = (2, 3e-3)  # engine and trainer disagree
    del scalars["perf/weight_sync_s"][2]  # no sync after step 3
    del scalars["critic/value_loss"]
    checks = {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 1), (logs[0], "no resume"))}
    failed = sorted(n for n, c in checks.items() if not c.ok)
    assert failed == sorted(["resumed run exited 0", FP32_CHECK,
                             "weights synced after every step", "TensorBoard tags present", "checkpoint resumed"])
    assert checks["weights synced after every step"].detail == "missing at steps [3]"
    assert "critic/value_loss" in checks["TensorBoard tags present"].detail
    assert "FAIL (2/7)" in smoke.report(list(checks.values()), "")


def test_missing_checkpoint_and_mismatch_tag(tmp_path):
    scalars, logs = _good(tmp_path)
    (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").unlink()
    del scalars["rollout/logprob_mismatch_max"]
    checks = {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs)}
    assert not checks["checkpoint written"].ok and not checks[FP32_CHECK].ok


def test_mismatch_bound_follows_the_dtype():
    assert smoke.mismatch_bound("fp32") == ("max", 1e-3)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        stat, limit = smoke.mismatch_bound(dtype)
        assert stat == "mean" and limit == 8 * torch.finfo(torch_dtype).eps
    assert smoke.mismatch_bound("fp16")[1] < smoke.mismatch_bound("bf16")[1] < 0.1
    with pytest.raises(ValueError, match="fp8"):
        smoke.mismatch_bound("fp8")


def test_run_dtype_is_the_coarser_of_trainer_and_engine():
    assert smoke.run_dtype("fp32", "cpu") == "fp32"
    assert smoke.run_dtype("fp32", "cuda") == "bf16"  # vLLM runs an fp32 model in bf16 on a GPU
    assert smoke.run_dtype("bf16", "cpu") == "bf16" and smoke.run_dtype("fp16", "cuda") == "fp16"


def test_config_dtype_reads_the_run_config():
    cfg = str(smoke.Path(smoke.__file__).resolve().parents[1] / "examples/tiny_cpu.yaml")
    assert smoke.config_dtype(cfg, []) == ("bf16" if torch.cuda.is_available() else "fp32")
    assert smoke.config_dtype(cfg, ["parallel.device=cpu"]) == "fp32"
    assert smoke.config_dtype(cfg, ["parallel.device=cuda"]) == "bf16"
    assert smoke.config_dtype(cfg, ["parallel.device=cpu", "model.params_dtype=fp16"]) == "fp16"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_bounds_the_mean_and_reports_the_max(tmp_path, dtype):
    scalars, logs = _good(tmp_path)
    _, limit = smoke.mismatch_bound(dtype)
    # ordinary half-precision rounding: a large max over the tokens, a small mean
    scalars["rollout/logprob_mismatch_max"] = [(1, 0.4), (2, 0.6), (3, 0.5)]
    scalars["rollout/logprob_mismatch_mean"] = [(1, 0.2 * limit), (2, 0.5 * limit), (3, 0.3 * limit)]
    name = f"train-vs-rollout log-prob mismatch mean < {limit:g} ({dtype})"
    checks = {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs, dtype=dtype)}
    assert all(c.ok for c in checks.values()), checks
    assert checks[name].detail == f"mean {0.5 * limit:.3g} over steps [1, 2, 3] (max 0.6)"
    # the same max in fp32 fails
    assert not {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs)}[FP32_CHECK].ok
    # a mean at the bound fails, and so does a step without the mean
    scalars["rollout/logprob_mismatch_mean"][2] = (3, limit)
    assert not {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs, dtype=dtype)}[name].ok
    del scalars["rollout/logprob_mismatch_mean"][2]
    assert not {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs, dtype=dtype)}[name].ok

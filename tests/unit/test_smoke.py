"""The smoke test's checks and report, from scalars and logs made by hand (no run)."""
from megatron_tppo import smoke


def _good(tmp_path):
    steps = [1, 2, 3]
    scalars = {t: [(s, 0.1) for s in steps] for t in smoke.REQUIRED_TAGS}
    scalars["rollout/logprob_mismatch_max"] = [(1, 2e-6), (2, 5e-6), (3, 4e-6)]
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
    assert "max 5e-06 over steps [1, 2, 3]" in text


def test_each_failure_is_named(tmp_path):
    scalars, logs = _good(tmp_path)
    scalars["rollout/logprob_mismatch_max"][1] = (2, 3e-3)  # engine and trainer disagree
    del scalars["perf/weight_sync_s"][2]  # no sync after step 3
    del scalars["critic/value_loss"]
    checks = {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 1), (logs[0], "no resume"))}
    failed = sorted(n for n, c in checks.items() if not c.ok)
    assert failed == sorted(["resumed run exited 0", "train-vs-rollout log-prob mismatch < 0.001",
                             "weights synced after every step", "TensorBoard tags present", "checkpoint resumed"])
    assert checks["weights synced after every step"].detail == "missing at steps [3]"
    assert "critic/value_loss" in checks["TensorBoard tags present"].detail
    assert "FAIL (2/7)" in smoke.report(list(checks.values()), "")


def test_missing_checkpoint_and_mismatch_tag(tmp_path):
    scalars, logs = _good(tmp_path)
    (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").unlink()
    del scalars["rollout/logprob_mismatch_max"]
    checks = {c.name: c for c in smoke.evaluate(scalars, tmp_path, (0, 0), logs)}
    assert not checks["checkpoint written"].ok and not checks["train-vs-rollout log-prob mismatch < 0.001"].ok

"""A non-finite loss never reaches the weights."""
import pytest
import torch


@pytest.mark.distributed
def test_nan_loss_skips_the_update(run_jobs):
    out = run_jobs([("nan", "tests.distributed._nan_job", [], 1)], timeout_s=240)
    r = torch.load(out / "nan.pt")
    assert r["bad"]["skipped"] == 1.0 and r["bad"]["nonfinite_loss"] == 1.0
    assert r["unchanged"], "weights changed after a NaN loss"
    assert r["good"]["skipped"] == 0.0 and r["finite"] and r["moved"] and r["steps"] == 1

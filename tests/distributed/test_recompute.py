"""Full activation recompute (LayoutConfig.recompute) changes memory, not results."""
import pytest
import torch


@pytest.mark.distributed
def test_recompute_full_equals_none(run_jobs):
    out = run_jobs([("recompute", "tests.distributed._recompute_job", [], 1)], timeout_s=240)
    res = torch.load(out / "recompute.pt")
    (loss0, gn0, lp0), (loss1, gn1, lp1) = res["none"], res["full"]
    assert abs(loss0 - loss1) < 1e-6 and abs(gn0 - gn1) < 1e-6
    assert (lp0 - lp1).abs().max().item() < 1e-6

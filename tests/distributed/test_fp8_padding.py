"""The engine with FP8-style padding (micro-batch widths rounded up to 16, also past the batch
width) gives the same outputs, losses and update as without it (megatron-core on CPU, fp32).
The FP8 GEMMs themselves need a GPU and Transformer Engine; this checks the shapes and that
padding changes nothing else."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_padded_micro_batches_change_nothing(run_jobs):
    out = run_jobs([("padding", "tests.distributed._padding_job", [], 1)], timeout_s=240)
    res = torch.load(out / "padding_rank0.pt")
    tight, padded = res["tight"], res["padded"]
    assert all(w % 16 == 0 for w in padded["widths"]) and max(padded["widths"]) > 37, padded["widths"]
    assert any(w % 16 for w in tight["widths"]), tight["widths"]
    for key in ("logprobs", "entropy", "values"):
        assert padded[key].shape == tight[key].shape == (6, 37)
        assert (padded[key] - tight[key]).abs().max() < 1e-5, key
    for key in ("policy_loss", "policy_grad_norm", "critic_loss", "critic_grad_norm"):
        assert abs(padded[key] - tight[key]) < 1e-5 * max(1.0, abs(tight[key])), key
    worst = max((padded["policy_params"][k] - v).abs().max().item() for k, v in tight["policy_params"].items())
    assert worst < 1e-5

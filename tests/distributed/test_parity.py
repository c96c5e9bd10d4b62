"""Layout parity with real processes: TP=2, PP=2 and DP=2 (distributed optimizer) equal TP=1.

Two jobs run side by side, once per session (see _worker.py): the single-process reference and
one 2-rank job that walks through TP=2, PP=2 and DP=2, saving a checkpoint at TP=2 and loading it
at PP=2. Same seed everywhere; fp32; tolerance 1e-5.

Parameters are compared after one Adam step at lr 1e-4. Adam normalizes each gradient element,
so an element whose gradient is near zero turns summation-order noise into an update difference
of up to ~lr * 1e-2; lr 1e-4 keeps that under the tolerance (at lr 1e-3 one element in 4096
differed by 1.07e-5).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

TOL = 1e-5
LAYOUTS = ["tp2", "pp2", "dp2"]


@pytest.fixture(scope="session")
def results(run_jobs):
    out = run_jobs([("ref", "tests.distributed._worker", ["ref"], 1),
                    ("layouts", "tests.distributed._worker", ["layouts"], 2)], timeout_s=300)
    ref = torch.load(out / "ref_rank0.pt")["ref"]
    ranks = [torch.load(out / f"layouts_rank{r}.pt") for r in range(2)]
    return ref, ranks


def _merged(ranks, tag, key):
    """Parameters of all pipeline stages (each rank wrote its own stage)."""
    merged = {}
    for r in ranks:
        merged.update(r[tag][key])
    return merged


def _max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"parameter names differ: {sorted(set(a) ^ set(b))[:5]}"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tag", ["tp2", "pp2"])
def test_forward_logprobs_entropy_values(results, tag):
    ref, ranks = results
    for rank in ranks:  # outputs are available on every rank of the replica
        r = rank[tag]
        assert _max_diff(r["logprobs"], ref["logprobs"]) < TOL
        assert _max_diff(r["entropy"], ref["entropy"]) < TOL
        assert _max_diff(r["values"], ref["values"]) < TOL
    assert ref["logprobs"][:, 0].abs().max() == 0  # token 0 has no prediction
    assert (ref["logprobs"] <= 0).all() and ref["logprobs"].min() < -1


@pytest.mark.parametrize("tag", LAYOUTS)
def test_train_step_loss_and_metrics(results, tag):
    ref, ranks = results
    for rank in ranks:
        r = rank[tag]
        assert r["policy_micro"] > ref["policy_micro"] == 1  # the layouts really split micro-batches
        for key in ("policy_loss", "policy_entropy", "critic_loss"):
            assert abs(r[key] - ref[key]) < TOL, key
        assert r["policy_tokens"] == ref["policy_tokens"] == 95  # summed over micro-batches and DP
        assert abs(r["policy_grad_norm"] - ref["policy_grad_norm"]) < TOL
        assert abs(r["critic_grad_norm"] - ref["critic_grad_norm"]) < TOL


@pytest.mark.parametrize("tag", LAYOUTS)
def test_parameters_after_one_step(results, tag):
    ref, ranks = results
    assert _max_param_diff(_merged(ranks, tag, "policy_params"), ref["policy_params"]) < TOL
    assert _max_param_diff(_merged(ranks, tag, "critic_params"), ref["critic_params"]) < TOL


@pytest.mark.parametrize("tag", ["tp2", "pp2"])
def test_forward_after_step(results, tag):
    ref, ranks = results
    assert _max_diff(ranks[0][tag]["logprobs_step1"], ref["logprobs_step1"]) < TOL
    assert _max_diff(ref["logprobs_step1"], ref["logprobs"]) > 1e-4  # the step moved the model


def test_checkpoint_tp2_loads_at_pp2(results):
    ref, ranks = results
    for rank in ranks:
        assert _max_diff(rank["pp2"]["ckpt_logprobs"], rank["tp2"]["logprobs_step1"]) < TOL
    # the second step from the loaded checkpoint (Adam moments included) equals the reference's
    assert abs(ranks[0]["pp2"]["ckpt_step2_loss"] - ref["step2_loss"]) < TOL
    assert _max_param_diff(_merged(ranks, "pp2", "ckpt_step2_params"), ref["step2_params"]) < TOL


def test_critic_backbone_from_policy_checkpoint(results):
    ref, ranks = results
    # PP=2 critic loading the TP=2 policy checkpoint == TP=1 critic copying the policy in memory
    assert _max_diff(ranks[0]["pp2"]["backbone_values"], ref["backbone_values"]) < TOL
    assert _max_diff(ref["backbone_values"], ref["values"]) > 1e-4  # the backbone really changed


@pytest.mark.parametrize("tag", ["tp2", "pp2"])
def test_untied_policy_forward(results, tag):
    ref, ranks = results
    assert _max_diff(ranks[0][tag]["untied_logprobs"], ref["untied_logprobs"]) < TOL
    assert _max_diff(ref["untied_logprobs"], ref["logprobs"]) > 1e-4  # really another output layer


def test_distributed_optimizer_everywhere(results):
    # one optimizer (and checkpoint format) for all layouts; at DP=2 it shards the Adam state
    ref, ranks = results
    for kinds in (ref["optimizer_kinds"], ranks[0]["tp2"]["optimizer_kinds"], ranks[0]["dp2"]["optimizer_kinds"]):
        assert kinds == ["DistributedOptimizer"]


def test_checkpoint_dp2_distributed_optimizer_resumes_at_tp2(results):
    ref, ranks = results
    r = ranks[0]["tp2_from_dp2"]
    assert r["steps"] == 2 and abs(r["lr"] - ref["step2_lr"]) < 1e-12
    assert abs(r["step2_loss"] - ref["step2_loss"]) < TOL
    assert _max_param_diff(_merged(ranks, "tp2_from_dp2", "step2_params"), ref["step2_params"]) < TOL

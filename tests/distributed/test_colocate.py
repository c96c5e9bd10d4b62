"""Colocation pieces with real gloo processes (see _colocate_job.py): trainer offload/onload,
DP-split forwards, and the max-reduced train-vs-rollout mismatch metric.

A DP=1 reference job and a 2-rank job (DP=2 with the distributed optimizer, then TP=2) run side
by side. Offload must free the engine's storages into one host buffer of exactly their bytes
(plus alignment) and restore them bit-identically; dropped gradients are not copied and come back
zero; a step after offload/onload must equal, bit for bit, a step of an engine that never
offloaded.
"""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.training.batching import merge_row_parts
from megatron_tppo.training.offload import ALIGN

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

TOL = 1e-5
LAYOUTS = ["dp1", "dp1_bf16", "dp2", "tp2"]


@pytest.fixture(scope="session")
def results(run_jobs):
    out = run_jobs([("ref", "tests.distributed._colocate_job", ["ref"], 1),
                    ("pair", "tests.distributed._colocate_job", ["pair"], 2)], timeout_s=360)
    res = torch.load(out / "ref_rank0.pt", weights_only=False)
    pair = [torch.load(out / f"pair_rank{r}.pt", weights_only=False) for r in range(2)]
    return {"dp1": [res["dp1"]], "dp1_bf16": [res["dp1_bf16"]], "dp2": [p["dp2"] for p in pair], "tp2": [p["tp2"] for p in pair]}


@pytest.mark.parametrize("tag", LAYOUTS)
def test_offload_at_step0_then_train_equals_never_offloaded(results, tag):
    for r in results[tag]:
        assert r["step0_empty"] and r["step0_identical"]
        st = r["step0"]
        # no Adam state yet: only bf16's fp32 master shards (made with the optimizer) are there
        masters = 2 * st["params_bytes"] if tag.endswith("bf16") else 0
        assert st["params_bytes"] > 0 and st["optimizer_bytes"] == pytest.approx(masters, rel=0.01)
        assert r["step1_equal"], "first step after a step-0 offload differs from the reference"


@pytest.mark.parametrize("tag", LAYOUTS)
def test_offload_frees_storages_and_restores_bit_identical(results, tag):
    for r in results[tag]:
        assert r["storages_empty"] and r["refused"]
        assert r["offloaded_kinds"] == ["grads", "optimizer", "params"]
        assert r["offload"]["bytes"] == r["held_bytes"] == r["onload"]["bytes"]
        assert r["offload"]["optimizer_bytes"] > 0  # Adam moments moved
        # an independent count (every live tensor in the process, host copies left out)
        assert r["freed_bytes"] >= 0.9 * r["engine_bytes"], (r["freed_bytes"], r["engine_bytes"])
        assert r["identical"] == []
        assert r["grads_only"] == (True, True)
        assert r["identical_after_cycles"] == []


@pytest.mark.parametrize("tag", LAYOUTS)
def test_one_host_buffer_of_exactly_the_storage_bytes(results, tag):
    for r in results[tag]:
        h = r["host"]
        assert h["buffers"] == 1 and h["aligned"]
        # each storage a slice starting at a multiple of ALIGN: no power-of-two rounding
        assert h["host_bytes"] == h["expected_host"]
        assert h["storage_bytes"] == h["expected_storage"] == r["offload"]["bytes"] == r["offload"]["storage_bytes"]
        assert 0 <= h["host_bytes"] - h["storage_bytes"] < ALIGN * h["storages"]
        assert r["host_added"] == h["host_bytes"]  # all live host tensors: no other copy exists
        # later cycles (grads only, then everything) reuse that buffer
        c = r["cycles_host"]
        assert (c["buffers"], c["ptr"], c["host_bytes"]) == (1, h["ptr"], h["host_bytes"])


@pytest.mark.parametrize("tag", LAYOUTS)
def test_dropped_grads_are_not_copied_and_come_back_zero(results, tag):
    for r in results[tag]:
        d, on = r["drop"], r["drop_onload"]
        assert d["dropped_bytes"] == d["grads_bytes"] == r["drop_grads_bytes"] > 0
        assert d["bytes"] == d["storage_bytes"] == d["params_bytes"] + d["optimizer_bytes"] > 0
        assert r["drop_host"]["ptr"] == r["host"]["ptr"]  # the layout fits the buffer: reused
        assert r["drop_empty"] and r["drop_dropped"] == ["grads"]
        assert on["zeroed_bytes"] == d["dropped_bytes"] and on["bytes"] == d["bytes"]
        # parameters and optimizer state bit-identical; the (nonzero) main grads now zero
        assert r["drop_mismatches"] and all(k.startswith("main_grad/") for k in r["drop_mismatches"])
        assert r["drop_grads_zero"]


@pytest.mark.parametrize("tag", LAYOUTS)
def test_colocated_sequence_holds_exactly_params_and_optimizer(results, tag):
    for r in results[tag]:
        c = r["coloc"]
        sync, gen = c["sync"], c["generation"]
        assert (sync["bytes"], sync["dropped_bytes"], sync["params_bytes"]) == (c["optimizer"], c["grads"], 0)
        assert (gen["bytes"], gen["params_bytes"], gen["dropped_bytes"]) == (c["params"], c["params"], 0)
        # laid out for the parameters already at the sync: one buffer, exact, never reallocated
        assert sync["host_bytes"] == gen["host_bytes"] == c["host_bytes"] == c["expected_host"]
        assert c["storage_bytes"] == c["expected_storage"] == c["params"] + c["optimizer"] == gen["storage_bytes"]
        assert c["buffers"] == 1 and c["dropped"] == ["grads"]
        assert c["onload"]["zeroed_bytes"] == c["grads"] and c["grads_zero"]


@pytest.mark.parametrize("tag", LAYOUTS)
def test_train_step_after_onload_equals_never_offloaded(results, tag):
    for r in results[tag]:
        # step 2 follows offload cycles ending with dropped grads
        assert r["step2_equal"], "loss/metrics of the step after offload+onload differ"
        assert r["step2_state_mismatches"] == []  # parameters, main grads and Adam state
        # step 3: the reference engine after the colocated sequence against the other without offload
        assert r["step3_equal"] and r["step3_state_mismatches"] == []


def test_bf16_master_shards_move_with_the_optimizer(results):
    r = results["dp1_bf16"][0]["offload"]
    # 2-byte parameters, 4-byte main grads; master shards (4) + Adam moments (8) per parameter
    assert r["grads_bytes"] == pytest.approx(2 * r["params_bytes"], rel=0.01)
    assert r["optimizer_bytes"] == pytest.approx(6 * r["params_bytes"], rel=0.01)


def test_dp2_shards_the_optimizer_state(results):
    dp1 = results["dp1"][0]["offload"]["optimizer_bytes"]
    dp2 = [r["offload"]["optimizer_bytes"] for r in results["dp2"]]
    assert sum(dp2) == pytest.approx(dp1, rel=0.02) and max(dp2) < 0.6 * dp1


@pytest.mark.parametrize("tag", ["dp2", "tp2"])
def test_mismatch_metrics_reduce_over_micro_batches_and_ranks(results, tag):
    ref = results["dp1"][0]["step1_metrics"]
    for r in results[tag]:
        m = r["step1_metrics"]
        assert m["num_micro_batches"] > ref["num_micro_batches"] == 1
        for key in ("loss", "logprob_abs_diff", "logprob_abs_diff_max"):
            assert abs(m[key] - ref[key]) < TOL, key


def test_mismatch_max_is_the_largest_token_difference(results):
    r = results["dp1"][0]
    from tests.distributed._colocate_job import make_batch

    b = make_batch()
    lp = merge_row_parts([r["policy_part"]])["logprobs"]  # the same initial weights
    diff = (lp - b["old_logprobs"]).abs() * b["loss_mask"]
    assert abs(r["step1_metrics"]["logprob_abs_diff_max"] - diff.max().item()) < TOL
    assert abs(r["step1_metrics"]["logprob_abs_diff"] - (diff.sum() / b["loss_mask"].sum()).item()) < TOL


@pytest.mark.parametrize("role,keys", [("policy", ["logprobs", "entropy"]), ("critic", ["values"])])
def test_dp2_forward_splits_rows_and_matches_dp1(results, role, keys):
    ref = merge_row_parts([results["dp1"][0][f"{role}_part"]])
    ranks = results["dp2"]
    parts = [r[f"{role}_part"] for r in ranks]
    got = merge_row_parts(parts)
    for k in keys:
        assert got[k].shape == ref[k].shape == (8, 32)
        assert (got[k] - ref[k]).abs().max().item() < TOL, k
    assert results["dp1"][0][f"{role}_rows_computed"] == 8
    assert [r[f"{role}_rows_computed"] for r in ranks] == [4, 4]  # each replica: half the rows
    rows = sorted(torch.cat([p["rows"] for p in parts]).tolist())
    assert rows == list(range(8))


def test_tp2_forward_parts_come_from_tp_rank0(results):
    ref = merge_row_parts([results["dp1"][0]["policy_part"]])
    ranks = results["tp2"]
    assert ranks[1]["policy_part"] is None
    got = merge_row_parts([r["policy_part"] for r in ranks])
    assert (got["logprobs"] - ref["logprobs"]).abs().max().item() < TOL
    assert [r["policy_rows_computed"] for r in ranks] == [8, 8]  # one replica: both TP ranks, all rows


def test_equal_rows_split_and_merge():  # pure, no processes
    from megatron_tppo.training.batching import data_parallel_rows

    lengths = torch.tensor([100, 1, 1, 1, 1, 1, 1, 1])
    by_tokens = data_parallel_rows(lengths, 2)
    assert [len(r) for r in by_tokens] == [1, 7]  # tokens alone: the long row gets a rank to itself
    equal = data_parallel_rows(lengths, 2, equal_rows=True)
    assert [len(r) for r in equal] == [4, 4] and 0 in equal[0].tolist()
    few = data_parallel_rows(torch.tensor([5, 3]), 3, equal_rows=True)
    assert [r.tolist() for r in few] == [[0], [1], []]
    x = torch.arange(12.0).view(3, 4)
    parts = [{"rows": r, "outputs": {"v": x[r]}} for r in data_parallel_rows(torch.tensor([4, 2, 3]), 2)]
    assert torch.equal(merge_row_parts(parts + [None, {"rows": torch.tensor([], dtype=torch.long),
                                                       "outputs": {}}])["v"], x)

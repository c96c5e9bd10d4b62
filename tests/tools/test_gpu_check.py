"""tools/gpu_check.py (its parts in tools/gpu_check_parts.py and tools/gpu_check_offload.py) for
real: every part's CPU meaning runs and passes (so the GPU check cannot rot between lent GPUs), and
a part that times out, cannot start or finds no GPU is reported as such, with its reason, and the
script exits non-zero."""
import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_tppo.training.offload import ALIGN
from tests.conftest import REPO

PARTS = ["ipc", "transfer_group", "offload", "startup", "checkpoint", "init_cost"]
# a Qwen2.5-32B decoder layer, counted by hand: QKV 5120 x (5120 + 2 x 8 x 128) + bias, output
# projection 5120 x 5120, gate/up 2 x 5120 x 27648, down 27648 x 5120, two RMSNorm weights
LAYER_32B = 5120 * 7168 + 7168 + 5120 * 5120 + 2 * 5120 * 27648 + 27648 * 5120 + 2 * 5120


def gpu_check(tmp_path, *args, timeout=600):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(out), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return p, json.loads(out.read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("gpu_check"), "--device", "cpu")


def result(cpu_run, part):
    return cpu_run[1]["parts"][part]["result"]


@pytest.mark.slow
def test_every_cpu_part_runs_and_passes(cpu_run):
    p, report = cpu_run
    assert p.returncode == 0, p.stdout + p.stderr
    assert report["ok"] and report["skipped"] == {} and list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "pass", (name, part["reason"], part.get("log_tail"))
        assert 0 < part["wall_s"] <= part["timeout_s"]
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["megatron_core"] and env["cuda_available"] is False
    assert report["wall_s"] < report["time_budget_s"]


@pytest.mark.slow
def test_ipc_round_trip_is_exact_with_handles_only_on_the_wire(cpu_run):
    r = result(cpu_run, "ipc")
    sent = r["sender"]["sent"]
    assert r["receivers"] == 3 and len(r["receiver_results"]) == 3 and sent["buckets"] == 3
    assert sent["bytes"] > 2.9 * r["bucket_bytes"]
    assert sent["wire_bytes"] < sent["bytes"] / 1000  # handles and acks, no tensor bytes
    for rec in r["receiver_results"]:
        assert rec["tensors_seen"] == 9 and rec["mismatched"] == [] and rec["failed"] == []
        assert rec["received"]["bytes"] == sent["bytes"] and rec["received"]["buckets"] == 3
    assert r["sender"]["failed"] == []  # (among them: no /dev/shm file left behind)


@pytest.mark.slow
def test_transfer_groups_over_gloo(cpu_run):
    r = result(cpu_run, "transfer_group")
    assert r["backend"] == "gloo" and r["world1"]["broadcast_exact"] and r["world1"]["ack_sum"] == 1
    assert [x["ack_sum"] for x in r["world2"]] == [2, 2] and all(x["broadcast_exact"] for x in r["world2"])


@pytest.mark.slow
def test_offload_moves_every_byte_and_reports_host_memory(cpu_run):
    r = result(cpu_run, "offload")
    n, off, on, held = r["parameters"], r["offload"], r["onload"], r["engine_storage_bytes"]
    # bf16 parameters, fp32 main grads, fp32 master shards + two Adam moments (+ Adam's step counters)
    assert off["params_bytes"] >= 2 * n and off["grads_bytes"] >= 4 * n and off["optimizer_bytes"] >= 12 * n
    moved = off["params_bytes"] + off["grads_bytes"] + off["optimizer_bytes"]
    assert off["bytes"] + off.get("dropped_bytes", 0) == moved == held["stepped"] == held["onloaded"]
    assert held["offloaded"] == 0 and on["bytes"] == off["bytes"]
    assert r["offload_again"]["bytes"] == r["onload_again"]["bytes"] == off["bytes"]
    host = r["host"]
    assert host["pinned_bytes"] == 0 and host["host_buffer_bytes"] >= off["bytes"]  # no pinning on CPU
    assert host.get("host_bytes", off["bytes"]) >= off["bytes"]
    assert all(math.isfinite(x) for x in r["step_losses"]) and r["offload_gb_per_s"] > 0
    assert set(r["memory"]) >= {"stepped", "offloaded", "onloaded"}
    assert all(m["rss_bytes"] > 0 for m in r["memory"].values())


@pytest.mark.slow
def test_offload_makes_the_controllers_moves_and_matches_a_reference(cpu_run):
    """The controller's own cycle around a generation (Colocation.enter over the schedule's phases):
    gradients dropped and optimizer state copied for the sync, the parameters for generation, onload
    for the values; the host buffer its exact layout; the next step equals a never-offloaded one's."""
    cy = result(cpu_run, "offload")["controller_cycle"]
    kinds, moves, host = cy["kinds"], cy["moves"], cy["host"]
    P, G, O = (kinds[k]["bytes"] for k in ("params", "grads", "optimizer"))
    assert cy["phases"] == ["updates", "sync", "generation", "values"] and list(moves) == cy["phases"][1:]
    calls = {n: m["policy_call"] for n, m in moves.items()}
    assert calls["sync"]["kwargs"] == {"params": False, "grads": "drop", "optimizer": True}
    assert calls["generation"]["kwargs"] == {"params": True, "grads": False, "optimizer": False}
    assert (calls["values"]["method"], calls["values"]["kwargs"]) == ("onload", {})
    assert "rollout.wake_up(['weights'])" in moves["sync"]["calls"] and "rollout.sleep(2)" in moves["values"]["calls"]
    sync, gen, back = (calls[n]["result"] for n in moves)
    assert sync["dropped_bytes"] == sync["grads_bytes"] == G and sync["bytes"] == O and sync["params_bytes"] == 0
    assert gen["bytes"] == P and gen["dropped_bytes"] == 0 and back["bytes"] == P + O and back["zeroed_bytes"] == G
    # what stays resident, on CPU the engine's storage bytes; the time of every move
    assert cy["resident_before"]["engine_bytes"] == P + G + O == moves["values"]["resident"]["engine_bytes"]
    assert moves["sync"]["resident"]["engine_bytes"] == P and moves["generation"]["resident"]["engine_bytes"] == 0
    assert all(0 < m["seconds"] <= m["wall_s"] <= m["enter_s"] and m["gb_per_s"] > 0 for m in moves.values())
    assert all(m["resident"]["rss_bytes"] > 0 for m in moves.values())
    # the host buffer: no pinning on CPU (pinned_bytes == host_bytes is the CUDA check); the exact layout
    assert host["pinned_bytes"] == 0 and host["offloader_pinned"] is False and not host["pinned_equals_host"]
    assert host["host_bytes"] == host["host_buffer_bytes"] == host["layout_bytes"] and host["storage_bytes"] == P + O
    assert 0 <= host["host_bytes"] - host["storage_bytes"] < ALIGN * host["copied_storages"]
    assert host["copied_storages"] == kinds["params"]["storages"] + kinds["optimizer"]["storages"] < host["storages"]
    assert cy["restore_mismatches"] == [] and cy["grads_zero_after_onload"]
    ref = cy["reference"]
    assert ref["reproduces_first_step"] and "not_judged" not in ref
    assert ref["step_bit_identical"] and ref["step_mismatches"] == [] and ref["param_max_abs_diff"] == 0
    assert ref["loss_after_cycle"] == ref["losses"][1] and math.isfinite(ref["loss_after_cycle"])


@pytest.mark.slow
def test_startup_runs_the_colocated_order(cpu_run):
    r = result(cpu_run, "startup")
    steps = [t["step"] for t in r["trace"]]
    assert steps == ["baseline", "engine_reserved", "engine_asleep", "trainer_built", "trainer_loaded",
                     "trainer_stepped", "trainer_offloaded", "engine_woken"]
    by = {t["step"]: t for t in r["trace"]}
    held = by["engine_reserved"]["engine"]["rss_bytes"] - by["engine_asleep"]["engine"]["rss_bytes"]
    assert held >= 0.9 * r["engine_reserve_bytes"]  # the stand-in really held its memory, then let go
    assert by["engine_woken"]["engine"]["ok"] and math.isfinite(by["trainer_stepped"]["loss"])
    assert by["trainer_offloaded"]["offload"]["bytes"] > 0


@pytest.mark.slow
def test_checkpoint_and_init_cost(cpu_run):
    ck = result(cpu_run, "checkpoint")
    assert ck["checkpoint_bytes"] >= 2 * ck["parameters"] and ck["save_s"] > 0 and ck["load_s"] > 0
    init = result(cpu_run, "init_cost")
    assert init["layer_parameters_32b"] == LAYER_32B and init["layer_parameters"] < LAYER_32B / 10
    # on CPU the 32B number is an extrapolation and says so
    assert "layer_32b_s" not in init and init["extrapolated_layer_32b_s"] > 0 and "estimate" in init["extrapolation"]
    assert init["move_to_gpu_s"] is None


def test_a_part_that_times_out_is_killed_and_reported(tmp_path):
    p, report = gpu_check(tmp_path, "--device", "cpu", "--parts", "ipc", "--part-timeout-s", "1", timeout=120)
    assert p.returncode == 1 and not report["ok"]
    part = report["parts"]["ipc"]
    assert part["status"] == "timeout" and "timed out after 1 s" in part["reason"] and "log_tail" in part


def test_parts_past_the_time_budget_are_skipped(tmp_path):
    p, report = gpu_check(tmp_path, "--device", "cpu", "--parts", "ipc,init_cost", "--time-budget-s", "1",
                          timeout=120)
    assert p.returncode == 1 and not report["ok"] and list(report["skipped"]) == ["ipc", "init_cost"]
    assert all(report["parts"][n]["status"] == "skipped" and "time budget" in report["parts"][n]["reason"]
               for n in ("ipc", "init_cost"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_with_its_reason(tmp_path):
    p, report = gpu_check(tmp_path, "--device", "cuda", "--parts", "offload", timeout=120)
    assert p.returncode == 1 and report["environment"]["cuda_available"] is False
    part = report["parts"]["offload"]
    assert part["status"] == "fail" and "torch sees no GPU" in part["reason"] and part["result"]["traceback"]

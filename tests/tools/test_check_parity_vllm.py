"""tools/check_parity.py --vllm-tp 2: a TP=2 vLLM engine (worker processes) started from random
weights and loaded only through the run's sync path (gloo transfer groups, one sender per pipeline
stage) matches megatron and HF to 1e-4, for a tied (Qwen2) and an untied (Llama) model; the Llama
case syncs over the ipc transport (the worker processes map the senders' shared-memory buckets)."""
from __future__ import annotations

import pytest

from megatron_tppo.weights.hf_config import save_random_hf_model
from tests.tools.test_convert import LLAMA, QWEN, run_tool


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("key, model, layouts, transport",
                         [("qwen", QWEN, "2x1,1x2", "gloo"), ("llama", LLAMA, "1x2", "ipc")])
def test_check_parity_vllm_tp2(tmp_path, key, model, layouts, transport):
    hf = save_random_hf_model(model, tmp_path / key, seed=3)
    rc, so, se = run_tool("check_parity", "--hf-dir", hf, "--layouts", layouts, "--vllm-tp", "2",
                          "--bucket-mb", "0.02", "--tol", "1e-4", "--transport", transport, timeout=600)
    assert rc == 0, so[-3000:] + se[-3000:]
    lines = so.strip().splitlines()
    assert lines[-1].endswith("OK)") and float(lines[-1].split("=")[1].split()[0]) < 1e-4
    n = len(layouts.split(","))
    assert sum(ln.startswith("vLLM(tp2)<-megatron") for ln in lines) == 2 * n


@pytest.mark.distributed
@pytest.mark.slow
def test_check_parity_vllm_a_failed_rank_is_an_error_not_a_hang(tmp_path):
    """A rank that fails before it opens its stage's transfer (here: a corrupt checkpoint) stops the
    tool with the rank's error at once; the engine does not wait for a sender that never comes."""
    hf = save_random_hf_model(QWEN, tmp_path / "qwen", seed=3)
    bad = tmp_path / "corrupt_ckpt"
    bad.mkdir()
    (bad / "metadata.json").write_text("not json")
    rc, so, se = run_tool("check_parity", "--hf-dir", hf, "--checkpoint", bad, "--layouts", "1x1", "--vllm",
                          timeout=240)
    assert rc != 0
    assert "a conversion rank failed" in se and "JSONDecodeError" in se, se[-3000:]

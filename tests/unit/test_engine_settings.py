"""vLLM engine settings for GPUs (issue 14 item 3): the LLM kwargs per platform, built by a pure
function so the GPU branch is tested without a GPU; max_num_seqs against each engine's slots."""
from __future__ import annotations

import pytest

from megatron_tppo import config as C
from megatron_tppo.config_io import load_config
from megatron_tppo.rollout.vllm_backend import llm_kwargs


def kw(on_cpu, **over):
    return llm_kwargs("/m", on_cpu=on_cpu, max_model_len=1024, max_num_seqs=32, **over)


def test_cpu_kwargs_are_eager_fp32_without_chunked_prefill():
    k = kw(True)
    assert k["enforce_eager"] is True and k["dtype"] == "float32" and k["enable_chunked_prefill"] is False
    assert k["max_num_seqs"] == 32 and k["max_num_batched_tokens"] == 8192
    # never above what the sequences can hold (vLLM warns), never below one whole sequence
    small = llm_kwargs("/m", on_cpu=True, max_model_len=128, max_num_seqs=8)["max_num_batched_tokens"]
    assert small == 8 * 128
    assert llm_kwargs("/m", on_cpu=True, max_model_len=9000, max_num_seqs=1)["max_num_batched_tokens"] == 9000
    assert "enable_sleep_mode" not in k and "gpu_memory_utilization" not in k


def test_gpu_kwargs_use_cuda_graphs_and_sleep_mode():
    k = kw(False, gpu_memory_utilization=0.7, tensor_parallel=2)
    assert k["enforce_eager"] is False and k["dtype"] == "bfloat16" and k["enable_sleep_mode"] is True
    assert k["gpu_memory_utilization"] == 0.7 and k["distributed_executor_backend"] == "mp"
    # unset (an engine alone on its GPUs: evaluation, tools): vLLM's own default, not None
    assert "gpu_memory_utilization" not in kw(False, gpu_memory_utilization=None)
    assert k["tensor_parallel_size"] == 2 and "enable_chunked_prefill" not in k
    assert kw(False, enforce_eager=True)["enforce_eager"] is True      # configurable on GPU
    assert kw(True, enforce_eager=False)["enforce_eager"] is False
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm_kwargs("/m", on_cpu=False, max_model_len=8, max_num_seqs=0)


def test_max_num_seqs_defaults_to_each_engines_share():
    r = load_config(None, ["rollout.num_slots=96", "rollout.num_engines=5"]).rollout
    assert r.slots_per_engine() == 20 and r.max_num_seqs is None    # ceil(96/5); shares are 19 or 20
    assert load_config(None, ["rollout.num_slots=96", "rollout.num_engines=5", "rollout.max_num_seqs=20"]).rollout.max_num_seqs == 20


def test_max_num_seqs_below_the_share_names_both_fields():
    with pytest.raises(C.ConfigError) as err:
        load_config(None, ["rollout.num_slots=64", "rollout.num_engines=2", "rollout.max_num_seqs=31"])
    msg = str(err.value)
    assert "rollout.max_num_seqs" in msg and "rollout.num_slots=64" in msg and "rollout.num_engines=2" in msg
    assert "= 32" in msg


def test_new_keys_parse_from_overrides():
    r = load_config(None, ["rollout.enforce_eager=true", "rollout.seeded=false"]).rollout
    assert r.enforce_eager is True and r.seeded is False
    d = load_config(None, []).rollout
    assert d.enforce_eager is None and d.seeded is None and d.max_num_seqs is None


def test_start_weights_pick_vllms_load_format_or_fail_before_vllm_starts():
    from megatron_tppo.rollout.vllm_backend import VLLMEngine

    assert kw(True)["load_format"] == "auto" and kw(False, load_format="dummy")["load_format"] == "dummy"
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="weights must be 'checkpoint' or 'dummy'"):
        VLLMEngine.from_config("/nonexistent", cfg.rollout, cfg.model, weights="random")

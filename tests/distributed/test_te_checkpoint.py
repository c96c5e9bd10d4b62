"""Checkpoints across layer specs (local spec -> Transformer Engine-style extra state) and the
optimizer's step layouts (torch Adam per parameter, FusedAdam per param group), on CPU with real
dist_checkpointing; tests/distributed/_te_checkpoint_job.py does the work and says what stands in
for Transformer Engine."""
import pickle

import pytest
import torch


@pytest.fixture(scope="module")
def res(run_jobs):
    out = run_jobs([("te_checkpoint", "tests.distributed._te_checkpoint_job", [], 1)], timeout_s=300)
    return torch.load(out / "te_checkpoint.pt", weights_only=False)


@pytest.mark.distributed
def test_local_checkpoint_loads_into_te_style_request(res):
    # the issue as reported: a plain load of the TE-style request fails on the absent extra state
    assert "Missing key in checkpoint state_dict" in res["plain_load_error"], res["plain_load_error"]
    assert "core_attention._extra_state" in res["plain_load_error"]
    # only the absent extra state is left out; the local linears' extra state is still loaded
    assert res["dropped"] == res["added"] == [f"decoder.layers.{i}.self_attention.core_attention._extra_state"
                                              for i in range(2)]
    assert len(res["request_extra_state_kept"]) == 8 and all(
        k.rsplit(".", 2)[-2] in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
        for k in res["request_extra_state_kept"])
    assert res["request_max_diff"] == 0.0


@pytest.mark.distributed
def test_missing_tensor_still_fails_with_its_name(res):
    err = res["missing_tensor_error"]
    assert err.startswith("CheckpointingException: Unexpected keys (not found in the checkpoint)"), err
    assert "decoder.final_layernorm.bias" in err


@pytest.mark.distributed
def test_engine_with_te_extra_state_loads_local_checkpoint(res):
    assert res["te_request_has_norm_extra_state"]  # megatron's own sharded_state_dict made the entry
    assert res["te_load_max_diff"] == 0.0
    assert res["te_norm_loaded"] is None  # nothing to load: the module keeps its own state
    assert res["te_after_step_max_diff"] == 0.0  # optimizer state came along
    assert res["backbone_max_diff"] == 0.0  # load_backbone into a critic of the TE style


@pytest.mark.distributed
def test_extra_state_in_the_checkpoint_is_loaded(res):
    loaded = res["te_extra_state_loaded"]
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.uint8
    assert pickle.loads(loaded.numpy().tobytes()) == {"recipe": "delayed", "amax_history_fwd": [1.5, 2.5]}
    assert res["te_to_te_max_diff"] == 0.0
    assert res["te_to_local_max_diff"] == 0.0  # a model without that module ignores the entry


@pytest.mark.distributed
def test_torch_adam_is_primed_per_parameter(res):
    assert res["torch_inner_types"] in (["Adam"], ["AdamW"])
    assert res["torch_state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert res["torch_steps"] == [0.0] and not res["torch_group_has_step"]
    assert res["torch_primed_vs_fresh"] == 0.0  # the primed state is that of a fresh optimizer
    assert res["torch_steps_after"] == [1.0]


@pytest.mark.distributed
def test_fused_adam_layout_is_primed_per_group(res):
    assert res["fused_group_steps"] == [("int", 0)]
    assert res["fused_state_keys"] == ["exp_avg", "exp_avg_sq"]  # no per-parameter step
    assert res["fused_state_dict_error"] == ""
    assert res["fused_vs_torch_adamw"] < 1e-6  # the stand-in is AdamW
    assert res["fused_primed_vs_fresh"] == 0.0 and res["fused_steps_after"] == [1]


@pytest.mark.distributed
def test_float_group_step_from_a_torch_adam_checkpoint_becomes_int(res):
    assert "takes an int step" in res["fused_float_step_error"]
    assert res["fused_restored_steps"] == [("int", 2)] and res["fused_restored_step_error"] == ""

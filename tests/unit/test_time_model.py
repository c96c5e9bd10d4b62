"""Start-up projection and the waits sized from it (megatron_tppo/planning/time_model.py), by hand."""
import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.planning import time_model as T
from megatron_tppo.planning.hardware import Host
from megatron_tppo.planning.memory import layer_params, model_params

RECIPE = "examples/qwen2.5_32b/tppo.yaml"


def test_startup_by_hand():
    cfg = load_config(RECIPE)
    host, inp = Host(fs_read_gb_s=4.0), T.StartupInputs()
    n, nc = model_params(cfg.model), model_params(cfg.model, value_head=True)
    fast = T.startup(cfg, 4, host, inp, sync_s=10.0)
    assert fast["engine_start_s"] == inp.engine_boot_s + inp.engine_compile_s  # dummy weights: nothing read
    assert fast["trainer_build_s"] == inp.trainer_boot_s  # no CPU initialization
    assert fast["checkpoint_load_s"] == pytest.approx((n + nc) * 2 / 4 / 4e9)  # bf16 weights, a quarter per node
    assert fast["total_s"] == pytest.approx(fast["engine_start_s"] + fast["trainer_build_s"]
                                            + fast["checkpoint_load_s"] + 10.0)
    slow = T.startup(cfg, 4, host, inp, dummy_engine_weights=False, skip_trainer_init=False, resume=True)
    assert slow["engine_weights_read_s"] == pytest.approx(2 * n * 2 / 4e9)  # 8 engines on 4 nodes: 2 per node
    assert slow["trainer_cpu_init_s"] == pytest.approx(32 * layer_params(cfg.model) / inp.cpu_init_params_s)
    assert slow["checkpoint_load_s"] == pytest.approx((n + nc) * 14 / 4 / 4e9)  # + fp32 master and Adam


def test_waits_are_a_margin_over_the_projection_with_a_floor():
    assert T.wait_s(10.0) == T.WAIT_FLOOR_S
    assert T.wait_s(1000.0) == 1000.0 * T.WAIT_MARGIN
    cfg = load_config(RECIPE)
    w = T.waits(cfg, 4, "gloo")
    up = T.startup(cfg, 4, resume=True, sync_s=T.sync_seconds(cfg, "gloo"))
    assert w.engine_start_s == T.wait_s(up["engine_start_s"])
    assert w.trainer_build_s == T.wait_s(up["trainer_build_s"] + up["checkpoint_load_s"])
    assert w.sync_s == T.wait_s(model_params(cfg.model) * 2 / 2e9)  # 2 GB/s host-staged

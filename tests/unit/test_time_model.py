"""Start-up projection, the weight sync term by term, the turn swaps and the waits sized from them
(megatron_tppo/planning/time_model.py), by hand."""
import math

import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.planning import schedule as S
from megatron_tppo.planning import time_model as T
from megatron_tppo.planning.hardware import GPU, Host, Links
from megatron_tppo.planning.layout import plan_placement
from megatron_tppo.planning.memory import layer_params, model_params
from megatron_tppo.weight_route import Route

RECIPE = "examples/qwen2.5_32b/tppo.yaml"
SPLIT = ["parallel.trainers=split", "parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2",
         "parallel.policy.data_parallel=1", "parallel.critic.data_parallel=1"]
SHARED = ["parallel.trainers=shared", "parallel.policy.pipeline_parallel=1", "parallel.critic.pipeline_parallel=1",
          "parallel.policy.data_parallel=4", "parallel.critic.data_parallel=4"]

# Qwen2.5-32B counted by hand: q and o 5120 x 5120, q bias 5120; k and v 5120 x 1024 (8 KV heads of
# 128) with biases; SwiGLU 3 x 5120 x 27648; two norms; 64 layers; embedding and untied output
# 152064 x 5120 each; the final norm
LAYER = 2 * 5120 * 5120 + 5120 + 2 * (5120 * 1024 + 1024) + 3 * 5120 * 27648 + 2 * 5120
EMB = 152064 * 5120
N = 64 * LAYER + 2 * EMB + 5120
BYTES = 2 * N  # bf16: what every engine receives
assert LAYER == 487_605_248 and N == 32_763_876_352
NVLINK, HBM_COPY, IB, PCIE, GLOO, BUCKET_S = 350e9, 1300e9, 40e9, 20e9, 2e9, 2e-3  # Links() and Host()


def test_startup_by_hand():
    cfg = load_config(RECIPE, SPLIT)
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


def test_shared_32b_sync_on_4_nodes_by_hand():
    """Policy TP8 x PP1 x DP4 and critic alike on all 32 GPUs, 8 TP4 engines over them: every policy
    rank gathers the whole model over its node's NVLink, packs it bucket by bucket, hands each bucket
    to the engine worker on its GPU, which copies its quarter into its weights."""
    cfg = load_config(RECIPE, SHARED)
    est = T.sync_estimate(cfg, plan_placement(cfg, 4, 8))
    assert (est.route.path, est.route.transport) == ("local", "ipc")
    assert est.bytes == BYTES
    buckets = math.ceil(BYTES / 2 ** 30)  # 1024 MiB buckets of one stage: 61.03 -> 62
    assert est.buckets == buckets == 62
    want = {"tp_allgather": BYTES * 7 / 8 / NVLINK,  # 7/8 of the model from the 7 other TP ranks
            "pack": BYTES / HBM_COPY,                 # every byte once into the bucket buffer
            "ipc_handoff": 62 * BUCKET_S,
            "engine_copy": BYTES / 4 / HBM_COPY}      # the TP4 worker's quarter
    assert est.terms == pytest.approx(want)
    assert list(est.terms) == list(want)  # in the order the bytes travel
    assert est.seconds == pytest.approx(0.1638 + 0.0504 + 0.124 + 0.0126, abs=1e-3)
    assert est.seconds < 0.74  # below NeMo-RL's 0.74-1.0 s for 30B, on these assumed links
    assert est.dominant == "tp_allgather"
    js = est.to_json()
    assert js["route"] == {"path": "local", "transport": "ipc", "why": "every engine worker's GPU holds a policy rank"}
    assert js["dominant"] == "tp_allgather" and js["seconds"] == pytest.approx(est.seconds)


def test_shared_pp2_crosses_nodes_over_infiniband():
    # TP8 x PP2 x DP2: rank r's stage peer is r + 16, two nodes away: the other stage comes over IB
    cfg = load_config(RECIPE, SHARED[:1] + ["parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2",
                                            "parallel.policy.data_parallel=2",
                                            "parallel.critic.data_parallel=2"])
    est = T.sync_estimate(cfg, plan_placement(cfg, 4, 8))
    stage0 = 2 * (32 * LAYER + EMB)          # the embedding
    stage1 = 2 * (32 * LAYER + EMB + 5120)   # the output layer and the final norm
    assert stage0 + stage1 == BYTES
    assert est.terms["tp_allgather"] == pytest.approx(stage1 * 7 / 8 / NVLINK)  # the larger stage
    assert est.terms["pp_broadcast"] == pytest.approx((BYTES - stage0) / IB)    # all but the smaller own stage
    assert est.buckets == math.ceil(stage0 / 2 ** 30) + math.ceil(stage1 / 2 ** 30) == 62
    assert est.dominant == "pp_broadcast" and est.seconds > 1.0
    # the same stages on one node's NVLink (a faster IB flag cannot beat it)
    fast = T.sync_estimate(cfg, plan_placement(cfg, 4, 8), links=Links(ib_gb_s=350.0))
    assert fast.terms["pp_broadcast"] == pytest.approx((BYTES - stage0) / NVLINK)


def test_split_32b_sync_over_gloo_by_hand():
    """Today's split recipe: TP8 x PP2 policy on nodes 0-1, engines on all 4 nodes; host-staged gloo
    from each stage's sender to all 32 workers: a binomial tree of ceil(log2(33)) = 6 full hops."""
    cfg = load_config(RECIPE, SPLIT)
    est = T.sync_estimate(cfg, plan_placement(cfg, 4, 8))
    assert (est.route.path, est.route.transport) == ("broadcast", "gloo")
    big = 2 * (32 * LAYER + EMB + 5120)  # the last stage, the larger: the stages send at once
    want = {"tp_allgather": big * 7 / 8 / NVLINK, "device_to_host": big / PCIE, "gloo_tree": 6 * big / GLOO,
            "host_to_device": BYTES / PCIE, "engine_copy": BYTES / 4 / HBM_COPY}
    assert est.terms == pytest.approx(want)
    assert est.dominant == "gloo_tree" and 98.0 < est.terms["gloo_tree"] < 98.6  # 6 x 32.76 GB / 2 GB/s
    assert est.seconds == pytest.approx(sum(want.values()))
    # this machine's loopback (0.36 GB/s) would make it 6 x 32.76 / 0.36 = 546 s of tree alone
    slow = T.sync_estimate(cfg, plan_placement(cfg, 4, 8), links=Links(gloo_gb_s=0.36))
    assert slow.terms["gloo_tree"] == pytest.approx(6 * big / 0.36e9)
    # a measured rate replaces the model
    measured = T.sync_estimate(cfg, plan_placement(cfg, 4, 8), links=Links(sync_gb_s=10.0))
    assert measured.terms == pytest.approx({"measured": BYTES / 10e9})


def test_nccl_broadcast_across_nodes_at_infiniband():
    # engines on GPUs of their own, on nodes of their own (8 nodes: trainers on 0-3, engines on 4-7)
    cfg = load_config(RECIPE, SPLIT + ["rollout.colocate=false", "parallel.device=cuda"])
    est = T.sync_estimate(cfg, plan_placement(cfg, 8, 8))
    big = 2 * (32 * LAYER + EMB + 5120)
    assert (est.route.path, est.route.transport) == ("broadcast", "nccl")
    assert est.terms == pytest.approx({"tp_allgather": big * 7 / 8 / NVLINK, "nccl_broadcast": big / IB,
                                       "engine_copy": BYTES / 4 / HBM_COPY})


def test_swaps_of_the_split_step_by_hand():
    """Split, TP8 x PP2: each GPU moves one trainer rank. A policy rank of the last stage holds
    n = (32 layers + the output layer) / 8 + the final norm; a critic rank of the first stage
    (32 layers + the embedding) / 8. Onload after generation: weights (2 B) + fp32 master and Adam
    (12 B, DP1) per parameter; before the sync the critic goes off (14 B) and the policy drops its
    optimizer (12 B); after the sync the policy's weights (2 B)."""
    cfg = load_config(RECIPE, SPLIT)
    place = plan_placement(cfg, 4, 8)
    table = S.phase_table(cfg, place, GPU(), utilization=0.9)
    n_pol = (32 * LAYER + EMB) / 8 + 5120
    n_cri = (32 * LAYER + EMB) / 8
    sw = T.swap_estimate(table, ("generation", "values", "updates", "sync", "generation"))
    assert [m["seconds"] for m in sw["moves"]] == pytest.approx(
        [14 * n_pol / PCIE, 0.0, max(14 * n_cri, 12 * n_pol) / PCIE, 2 * n_pol / PCIE])
    assert sw["seconds"] == pytest.approx((14 * n_pol + 14 * n_cri + 2 * n_pol) / PCIE)


def test_waits_are_a_margin_over_the_projection_with_a_floor():
    assert T.wait_s(10.0) == T.WAIT_FLOOR_S
    assert T.wait_s(1000.0) == 1000.0 * T.WAIT_MARGIN
    cfg = load_config(RECIPE, SPLIT)
    place = plan_placement(cfg, 4, 8)
    gloo = T.sync_estimate(cfg, place).seconds  # about 103 s (the test above)
    w = T.waits(cfg, 4, "gloo")  # train passes the transport alone: the placement is found again
    up = T.startup(cfg, 4, resume=True, sync_s=gloo)
    assert w.engine_start_s == T.wait_s(up["engine_start_s"])
    assert w.trainer_build_s == T.wait_s(up["trainer_build_s"] + up["checkpoint_load_s"])
    assert w.sync_s == pytest.approx(3 * gloo) and w.sync_s > T.WAIT_FLOOR_S
    assert T.waits(cfg, 4, Route("broadcast", "gloo", "x"), placement=place).sync_s == pytest.approx(3 * gloo)
    # shared: a third of a second -> the floor
    shared = load_config(RECIPE, SHARED)
    assert T.waits(shared, 4, "ipc").sync_s == T.WAIT_FLOOR_S


def test_swaps_of_the_shared_step_by_hand():
    """Shared, TP8 x PP1 x DP4: every GPU holds a policy rank with n_p = (64 layers + embedding +
    output layer) / 8 + the final norm, and a critic rank with n_c = (64 layers + embedding) / 8 +
    the final norm + the value head. A trainer's state is weights (2 B) + Adam over DP4 (12/4 B):
    5 B per parameter. After generation the critic comes on (values, its update); then it goes off
    and the policy comes on; before the sync the policy drops its optimizer (3 B), after it its
    weights (2 B)."""
    cfg = load_config(RECIPE, SHARED)
    table = S.phase_table(cfg, plan_placement(cfg, 4, 8), GPU(), utilization=0.9)
    n_p = (64 * LAYER + 2 * EMB) / 8 + 5120
    n_c = (64 * LAYER + EMB) / 8 + 2 * 5120
    cycle = ("generation", "values", "updates@critic", "updates@policy", "sync", "generation")
    sw = T.swap_estimate(table, cycle)
    assert [m["seconds"] for m in sw["moves"]] == pytest.approx(
        [5 * n_c / PCIE, 0.0, (5 * n_c + 5 * n_p) / PCIE, 3 * n_p / PCIE, 2 * n_p / PCIE])
    assert sw["seconds"] == pytest.approx(10 * (n_c + n_p) / PCIE) and 4.0 < sw["seconds"] < 4.1

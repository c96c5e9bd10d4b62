"""The pure placement plan, checked against layouts worked out by hand (the 32B recipe among them)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tppo import plan as CLI
from megatron_tppo.planning import hardware as H
from megatron_tppo.planning import memory as M
from megatron_tppo.planning import plan as P
from megatron_tppo.config_io import load_config
from megatron_tppo.planning.layout import Gpu, PlacementError, cluster_shape, plan_placement, route_of, sites_of

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples/qwen2.5_32b/tppo.yaml")
TINY = str(ROOT / "examples/tiny_cpu.yaml")


SPLIT = ["parallel.trainers=split", "parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2"]


def recipe(nodes: int):
    """The 32B recipe's engines with the split trainers, TP8 x PP2 each, scaled to ``nodes`` as
    `plan --fill` scales them (DP = nodes/4, engines = GPUs/4)."""
    k = nodes // 4
    return load_config(RECIPE, SPLIT + [f"parallel.policy.data_parallel={k}", f"parallel.critic.data_parallel={k}",
                                        f"rollout.num_engines={nodes * 2}"])


def shared_recipe(nodes: int):
    """The same with the shared trainers, TP8 x PP1 each over all GPUs (DP = GPUs / 8)."""
    return load_config(RECIPE, ["parallel.trainers=shared", "parallel.policy.pipeline_parallel=1",
                                "parallel.critic.pipeline_parallel=1", f"parallel.policy.data_parallel={nodes}",
                                f"parallel.critic.data_parallel={nodes}", f"rollout.num_engines={nodes * 2}"])


def gpus(actor):
    return [(g.node, g.index) for g in actor.gpus]


@pytest.mark.parametrize("nodes", [4, 8, 16])
def test_32b_recipe_colocated_by_hand(nodes):
    p = plan_placement(recipe(nodes), nodes, 8)
    total = nodes * 8
    assert p.gpus_requested == total == p.gpus_available  # 4 nodes: exactly 32, not 64
    half = total // 2
    # policy TP8 x PP2 x DP(nodes/4) = half the GPUs from GPU 0; rank r on global GPU r
    assert [gpus(a) for a in p.policy] == [[(r // 8, r % 8)] for r in range(half)]
    # critic: the other half
    assert [gpus(a) for a in p.critic] == [[((half + r) // 8, (half + r) % 8)] for r in range(half)]
    # engines TP4 over all GPUs: engine e on node e // 2, GPUs 0-3 or 4-7
    assert len(p.engines) == total // 4
    for e, a in enumerate(p.engines):
        assert gpus(a) == [(e // 2, 4 * (e % 2) + j) for j in range(4)]
    # every GPU hosts exactly one trainer rank and one engine worker, each declaring half of it
    assert all(a.gpu_fraction == 0.5 for a in p.policy + p.critic + p.engines)
    assert p.node_gpus() == {n: list(range(8)) for n in range(nodes)}
    # TP groups of 8 consecutive ranks: each inside one node
    for group in range(half // 8):
        assert len({p.policy[group * 8 + i].gpus[0].node for i in range(8)}) == 1


@pytest.mark.parametrize("nodes", [4, 8, 16])
def test_32b_shared_by_hand(nodes):
    p = plan_placement(shared_recipe(nodes), nodes, 8)
    total = nodes * 8
    assert p.gpus_requested == total
    # policy and critic both TP8 x PP1 x DP(nodes) from GPU 0: rank r of each on global GPU r
    assert [gpus(a) for a in p.policy] == [[(r // 8, r % 8)] for r in range(total)]
    assert [gpus(a) for a in p.critic] == [[(r // 8, r % 8)] for r in range(total)]
    for e, a in enumerate(p.engines):
        assert gpus(a) == [(e // 2, 4 * (e % 2) + j) for j in range(4)]
    # a GPU holds a policy rank, a critic rank and an engine worker, a third each
    assert all(a.gpu_fraction == pytest.approx(1 / 3) for a in p.policy + p.critic + p.engines)
    # engine e's worker j (GPU 4(e%2)+j of node e//2) receives from policy rank 8(e//2) + 4(e%2) + j
    cfg = shared_recipe(nodes)
    sites = sites_of(p, cfg.parallel.policy)
    assert [(s.engine, s.worker, s.policy_rank) for s in sites] == [
        (e, j, 8 * (e // 2) + 4 * (e % 2) + j) for e in range(nodes * 2) for j in range(4)]
    route = route_of(cfg, p)
    assert (route.path, route.transport) == ("local", "ipc")


def test_32b_recipe_not_colocated_needs_disjoint_gpus():
    split = SPLIT + ["parallel.policy.data_parallel=1", "parallel.critic.data_parallel=1", "rollout.colocate=false"]
    with pytest.raises(PlacementError, match=r"needs 64 GPUs \(policy 16 \+ critic 16 \+ vLLM 8x4\), the cluster has 4 x 8"):
        plan_placement(load_config(RECIPE, split), 4, 8)
    p = plan_placement(load_config(RECIPE, split), 8, 8)
    assert p.gpus_requested == 64
    trainer = {g for a in p.policy + p.critic for g in a.gpus}
    engine = {g for a in p.engines for g in a.gpus}
    assert not trainer & engine and len(trainer) == 32 and len(engine) == 32
    assert gpus(p.engines[0]) == [(4, 0), (4, 1), (4, 2), (4, 3)]
    assert all(a.gpu_fraction == 1.0 for a in p.policy + p.engines)


def test_rehearsal_shape_two_nodes_of_two():
    c = load_config(TINY, ["parallel.policy.tensor_parallel=2", "parallel.critic.pipeline_parallel=2",
                           "rollout.tensor_parallel=2"])
    p = plan_placement(c, 2, 2)
    assert [gpus(a) for a in p.policy] == [[(0, 0)], [(0, 1)]]
    assert [gpus(a) for a in p.critic] == [[(1, 0)], [(1, 1)]]
    assert [gpus(a) for a in p.engines] == [[(0, 0), (0, 1)]]
    assert p.bundle_of(Gpu(1, 1)) == (1, 1)
    js = p.to_json()
    assert js["gpus_requested"] == 4 and js["gpus_available"] == 4
    assert js["groups"]["rollout"][0]["bundles"] == [{"node": 0, "gpu": 0, "bundle": 0},
                                                     {"node": 0, "gpu": 1, "bundle": 1}]


@pytest.mark.parametrize("over,nodes,per,msg", [
    # a 3-GPU policy, then a TP2 critic from GPU 3 of 4-GPU nodes: its first TP group is GPUs 3 and 4
    (["parallel.policy.data_parallel=3", "parallel.critic.tensor_parallel=2"], 2, 4,
     r"parallel.critic.tensor_parallel=2: its TP groups would straddle nodes"),
    (["rollout.tensor_parallel=4"], 1, 2, r"rollout.tensor_parallel=4 spans nodes"),
    (["rollout.tensor_parallel=2", "rollout.colocate=false", "parallel.policy.data_parallel=2"], 2, 4,
     r"engines would straddle nodes"),
    (["rollout.num_engines=3"], 1, 8, r"3 engines x rollout.tensor_parallel=1 = 3 GPUs, but the trainers hold only 2"),
])
def test_refusals_name_the_field(over, nodes, per, msg):
    with pytest.raises(PlacementError, match=msg):
        plan_placement(load_config(TINY, over), nodes, per)


def test_cluster_shape():
    assert cluster_shape([0.0, 0.0]) is None
    assert cluster_shape([0.0, 8.0, 8.0]) == (2, 8)  # a CPU-only head node is left out
    with pytest.raises(PlacementError, match="differ in GPU count"):
        cluster_shape([8.0, 4.0])


def test_plan_cli_json_gives_the_bundles():
    out = subprocess.run([sys.executable, "-m", "megatron_tppo.plan", "--config", RECIPE, "--nodes", "4", "--json",
                          *SPLIT, "parallel.policy.data_parallel=1", "parallel.critic.data_parallel=1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    js = json.loads(out)
    assert js["gpus_requested"] == 32 and js["gpus_available"] == 32
    assert len(js["groups"]["policy"]) == 16 and len(js["groups"]["rollout"]) == 8
    assert js["groups"]["critic"][0]["bundles"] == [{"node": 2, "gpu": 0, "bundle": 0}]
    assert js["node_bundles"] == {str(n): 8 for n in range(4)}
    # split: host-staged gloo from the stage senders to every worker
    assert js["sync"]["route"]["path"] == "broadcast" and js["sync"]["dominant"] == "gloo_tree"
    assert {w["transport"] for w in js["sync"]["workers"]} == {"gloo"} and len(js["sync"]["workers"]) == 32
    assert js["layouts"]["config"] == "split" and js["layouts"]["split"]["step_s"] > 0


def test_make_plan_counts_placement_gpus():
    cfg = load_config(RECIPE, [])
    plan = P.make_plan(cfg, 4, 8)
    assert plan.numbers["gpus_used"] == 32 and plan.placement.gpus_requested == 32


def test_ipc_across_nodes_is_refused_naming_the_field():
    # the 32B recipe on 4 nodes: engines on every node, the stage senders on nodes 0 and 1
    cfg = load_config(RECIPE, ["rollout.weight_transport=ipc", "parallel.trainers=split",
                               "parallel.policy.data_parallel=1", "parallel.critic.data_parallel=1",
                               "parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2"])
    with pytest.raises(PlacementError, match=r"rollout\.weight_transport=ipc: ipc: engine 4 worker 0 has no policy "
                                              r"rank on its GPU, and engine 0 worker 0 runs off the node of a "
                                              r"pipeline stage's sender"):
        plan_placement(cfg, 4, 8)
    # one node: every engine worker shares its senders' node -> placed (and auto plans the sync over ipc)
    tiny = load_config(TINY, ["rollout.weight_transport=ipc", "rollout.colocate=true", "rollout.num_engines=1"])
    assert plan_placement(tiny, 1, 8).engines
    auto = load_config(TINY, ["rollout.colocate=true", "rollout.num_engines=1", "parallel.device=cuda"])
    assert "route local/ipc" in "\n".join(P.make_plan(auto, nodes=1, gpus_per_node=8).lines)

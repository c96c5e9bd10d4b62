"""The placement plan applied on a real Ray cluster with logical GPUs (PLATFORM.md): every placement
group becomes ready, each actor lands in the bundle the plan names, and actors that the plan
colocates see the same ``CUDA_VISIBLE_DEVICES``."""
from __future__ import annotations

import os

import pytest
import ray

from megatron_tppo.config_io import load_config
from megatron_tppo.controller.ray_placement import PlacedCluster, plan_for_cluster
from tests.e2e.conftest import REPO, RAY_GPUS

pytestmark = pytest.mark.usefixtures("ray_cluster")


class Probe:
    def info(self) -> dict:
        return {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "node": ray.util.get_node_ip_address()}


def start(placed, actors):
    probe = ray.remote(Probe)
    handles = [probe.options(**placed.actor_options(a)).remote() for a in actors]
    return handles, ray.get([h.info.remote() for h in handles], timeout=120)


@pytest.mark.parametrize("colocate", [True, False])
def test_plan_applied_on_logical_gpus(colocate):
    cfg = load_config(str(REPO / "examples/tiny_cpu.yaml"),
                      ["parallel.policy.tensor_parallel=2", "parallel.critic.pipeline_parallel=2",
                       "rollout.tensor_parallel=2", f"rollout.colocate={str(colocate).lower()}"])
    plan, on_gpus = plan_for_cluster(cfg, "cpu")
    assert on_gpus and (plan.nodes, plan.gpus_per_node) == (1, RAY_GPUS)
    assert plan.gpus_requested == (4 if colocate else 6)
    placed = PlacedCluster(plan, on_gpus, timeout_s=60)  # raises unless every group is ready
    handles = []
    try:
        h_pol, pol = start(placed, plan.policy)
        h_cri, cri = start(placed, plan.critic)
        h_eng, eng = start(placed, plan.engines)
        handles = h_pol + h_cri + h_eng
        # one distinct device per trainer rank (its own bundle), as the plan says
        trainer_devices = [i["cuda"] for i in pol + cri]
        assert all(d is not None and "," not in d for d in trainer_devices)
        assert len(set(trainer_devices)) == 4
        # the engine actor shares its first GPU's bundle; CUDA_VISIBLE_DEVICES for its workers lists all
        engine_devices = placed.visible_devices(plan.engines[0]).split(",")
        assert len(engine_devices) == 2 and eng[0]["cuda"] == engine_devices[0]
        if colocate:  # engine workers on the policy's GPUs 0 and 1: the same devices as policy ranks 0, 1
            assert engine_devices == [pol[0]["cuda"], pol[1]["cuda"]]
        else:
            assert not set(engine_devices) & set(trainer_devices)
        # the placement groups reserved exactly the planned GPUs, no more
        free = ray.available_resources().get("GPU", 0.0)
        assert free == pytest.approx(RAY_GPUS - plan.gpus_requested, abs=1e-6)
    finally:
        for h in handles:
            ray.kill(h)
        placed.shutdown()

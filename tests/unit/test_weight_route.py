"""The one rule for how weights travel (megatron_tppo.weight_route), case by case, and what the
placement asks of it: worked out by hand from where the workers sit."""
import pytest

from megatron_tppo.config import ConfigError
from megatron_tppo.config_io import load_config
from megatron_tppo.planning.layout import PlacementError, plan_placement, route_of, sites_of
from megatron_tppo.weight_route import TransportError, WorkerSite, check_request, choose
from tests.unit.test_placement import RECIPE, TINY


def site(policy_rank=None, nodes=True, sender_gpu=False, engine=0, worker=0):
    return WorkerSite(engine, worker, policy_rank, nodes, sender_gpu)


def test_every_worker_with_a_policy_rank_takes_the_local_route():
    sites = [site(0), site(1, worker=1), site(2, nodes=False, engine=1), site(3, nodes=False, engine=1, worker=1)]
    for device in ("cpu", "cuda"):
        for requested in ("auto", "ipc"):
            r = choose(requested, device, True, sites)
            assert (r.path, r.transport) == ("local", "ipc")
    # an explicit host-staged choice stays possible
    assert (choose("gloo", "cuda", True, sites).path, choose("gloo", "cuda", True, sites).transport) == \
        ("broadcast", "gloo")


def test_broadcast_cases_of_auto():
    # engines on GPUs of their own: nccl on cuda, gloo on cpu
    own = [site(None), site(None, worker=1)]
    assert choose("auto", "cuda", False, own).transport == "nccl"
    assert choose("auto", "cpu", False, own).transport == "gloo"
    # a worker on a sender's GPU, all on the senders' node: ipc broadcast
    one_node = [site(0, sender_gpu=True), site(None, worker=1)]
    assert (choose("auto", "cuda", True, one_node).path, choose("auto", "cuda", True, one_node).transport) == \
        ("broadcast", "ipc")
    # ... and one off the senders' node: host-staged gloo, saying why
    split = [site(0, sender_gpu=True), site(None, nodes=False, engine=1)]
    r = choose("auto", "cuda", True, split)
    assert (r.path, r.transport) == ("broadcast", "gloo") and "host-staged" in r.why and "engine 1 worker 0" in r.why


def test_refusals_name_the_worker_or_the_reason():
    with pytest.raises(TransportError, match="engine 1 worker 0 has no policy rank on its GPU, and engine 1 worker 0 "
                                             "runs off the node"):
        choose("ipc", "cuda", True, [site(0, sender_gpu=True), site(None, nodes=False, engine=1)])
    with pytest.raises(TransportError, match="nccl needs parallel.device cuda"):
        check_request("nccl", "cpu", False)
    with pytest.raises(TransportError, match="NCCL refuses"):
        check_request("nccl", "cuda", True)
    with pytest.raises(TransportError, match="must be one of"):
        check_request("shm", "cpu", False)
    with pytest.raises(TransportError, match="no engine worker"):
        choose("auto", "cpu", True, [])
    # config validation asks the same rule, naming the field
    with pytest.raises(ConfigError, match="rollout.weight_transport.*nccl needs parallel.device cuda"):
        load_config(TINY, ["rollout.weight_transport=nccl", "parallel.device=cpu"])
    with pytest.raises(ConfigError, match="parallel.trainers.*needs rollout.colocate=true"):
        load_config(TINY, ["parallel.trainers=shared", "rollout.colocate=false"])


SHARED_32B = ["parallel.trainers=shared", "parallel.policy.pipeline_parallel=1", "parallel.policy.data_parallel=4",
              "parallel.critic.pipeline_parallel=1", "parallel.critic.data_parallel=4"]


def test_shared_32b_every_engine_worker_from_the_policy_rank_on_its_gpu():
    cfg = load_config(RECIPE, SHARED_32B)
    p = plan_placement(cfg, 4, 8)
    assert p.gpus_requested == 32
    # policy and critic both on GPUs 0..31; engine e (TP4) on node e // 2, GPUs 4 (e % 2) .. +3
    assert [(a.gpus[0].node, a.gpus[0].index) for a in p.policy] == [(r // 8, r % 8) for r in range(32)]
    assert [a.gpus for a in p.critic] == [a.gpus for a in p.policy]
    sites = sites_of(p, cfg.parallel.policy)
    assert len(sites) == 32
    for s in sites:
        assert s.policy_rank == 8 * (s.engine // 2) + 4 * (s.engine % 2) + s.worker
    assert [s.on_sender_gpu for s in sites].count(True) == 1  # PP1: rank 0 is the one stage's sender
    assert (route_of(cfg, p).path, route_of(cfg, p).transport) == ("local", "ipc")
    # three actors on every GPU: each declares a third
    assert all(abs(a.gpu_fraction - 1 / 3) < 1e-12 for a in p.policy + p.critic + p.engines)


def test_split_32b_is_host_staged_and_its_ipc_refused():
    cfg = load_config(RECIPE, ["parallel.trainers=split", "parallel.policy.pipeline_parallel=2",
                               "parallel.policy.data_parallel=1", "parallel.critic.pipeline_parallel=2",
                               "parallel.critic.data_parallel=1"])
    p = plan_placement(cfg, 4, 8)
    r = route_of(cfg, p)
    assert (r.path, r.transport) == ("broadcast", "gloo")
    # engines 4..7 sit on the critic's nodes: no policy rank on their GPUs
    assert [s.engine for s in sites_of(p, cfg.parallel.policy) if s.policy_rank is None] == [e for e in range(4, 8)
                                                                                           for _ in range(4)]
    with pytest.raises(PlacementError, match="rollout.weight_transport=ipc"):
        plan_placement(load_config(RECIPE, ["parallel.trainers=split", "rollout.weight_transport=ipc",
                                            "parallel.policy.pipeline_parallel=2", "parallel.policy.data_parallel=1",
                                            "parallel.critic.pipeline_parallel=2", "parallel.critic.data_parallel=1"]),
                       4, 8)

"""Weights from real megatron-core trainer ranks into real vLLM engines over the gloo transfer
groups (megatron_tppo.controller.weight_sync), on the session's Ray cluster.

The engines start from one random model, the policy loads another; after a sync vLLM's prompt
log-probs must equal the policy's own (megatron forward) to 1e-4. Two layouts cover the cases:
policy TP=2 into one TP=2 engine (tied embeddings; vLLM's multiprocess executor; broadcast over
gloo, then the local route), and policy PP=2 into two TP=1 engines (untied, a model some 25x the bucket, where memory is
checked: senders and receivers grow by a few buckets at most, not by the model). The first also
runs the ipc transport on the same actors (the engine's worker processes map the sender's
shared-memory buckets): exact, only handles on the wire, and the same engine as after gloo. The
second is the local route with a pipeline: each worker gets the other stage's buckets relayed over
the policy's PP group; then a stalled receiver (its process stopped) is named in bounded time.
"""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.config_io import load_config
from tests.conftest import TINY_MODEL
from tests.e2e.conftest import REPO

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

# ~50 MB fp32: 12 layers of ~3.8 MB, 2 MB embedding and output layer each; every module <= 2 MB
MEDIUM = ["model.num_layers=12", "model.hidden_size=256", "model.ffn_hidden_size=1024", "model.num_attention_heads=8",
          "model.num_query_groups=2", "model.vocab_size=2048", "model.max_position_embeddings=128"]
SEQS = [[5, 17, 42, 99, 3, 61, 7, 250, 11], [250, 7, 8, 9, 100, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def make_cfg(model: list[str], extra: list[str]):
    return load_config(str(REPO / "examples/tiny_cpu.yaml"), model + ["rollout.colocate=true"] + extra)


def policy_logprobs(policy, seqs) -> list[torch.Tensor]:
    width = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    lp = policy.forward({"tokens": tokens, "attention_mask": mask})["logprobs"]
    return [lp[i, 1:len(s)].double() for i, s in enumerate(seqs)]


def engine_logprobs(rollout, seqs) -> list[list[torch.Tensor]]:
    import ray

    got = ray.get([w.call.remote("prompt_logprobs", seqs) for w in rollout.workers], timeout=300)
    return [[torch.tensor(x, dtype=torch.float64) for x in per_engine] for per_engine in got]


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture
def cluster_parts(tmp_path):
    """build(cfg) -> (policy, rollout) on fresh actors, the engines started from model A and the
    policy loaded with model B; everything is shut down after the test."""
    from megatron_tppo.controller.groups import RolloutGroup, TrainerGroup
    from megatron_tppo.controller.ray_placement import PlacedCluster, plan_for_cluster
    from megatron_tppo.weights.hf_config import save_random_hf_model

    made = []

    def build(cfg):
        start, other = tmp_path / "engine_start", tmp_path / "policy"
        save_random_hf_model(cfg.model, start, seed=1)
        save_random_hf_model(cfg.model, other, seed=2)
        plan, on_gpus = plan_for_cluster(cfg, "cpu")
        placed = PlacedCluster(plan, on_gpus, timeout_s=120)
        made.append(placed)
        rollout = RolloutGroup("vllm", str(start), cfg.rollout, cfg.model, placed=placed)
        made.append(rollout)
        policy = TrainerGroup("policy", cfg.model, cfg.parallel.policy, cfg.optim.policy, role="policy",
                              device="cpu", seed=0, total_steps=1, placed=placed)
        made.append(policy)
        policy.load_hf(str(other))
        return policy, rollout, plan

    yield build
    for part in reversed(made):
        part.shutdown()


def test_policy_tp2_into_tp2_engine_tied(cluster_parts, tmp_path):
    from megatron_tppo.controller.weight_sync import WeightSync

    layout = ["parallel.policy.tensor_parallel=2", "rollout.tensor_parallel=2", "rollout.num_engines=1",
              "rollout.weight_sync_bucket_mb=1"]
    cfg = make_cfg(TINY_MODEL, layout + ["rollout.weight_transport=gloo"])
    assert cfg.model.tie_word_embeddings
    policy, rollout, plan = cluster_parts(cfg)
    want = policy_logprobs(policy, SEQS)
    (before,) = engine_logprobs(rollout, SEQS)
    assert worst(before, want) > 1e-2  # the engine really starts from other weights
    sync = WeightSync(policy, rollout, cfg, placement=plan)
    try:
        assert sync.route.to_json()["transport"] == "gloo" and sync.route.path == "broadcast" and sync.world_size == 3
        m = sync.sync(version=1)
        (after,) = engine_logprobs(rollout, SEQS)
        assert worst(after, want) < 1e-4, worst(after, want)
        assert m["perf/weight_sync_buckets"] >= 2 and m["perf/weight_sync_gb"] > 0
        assert m["perf/weight_sync_max_bucket_mb"] <= 1.0 + 1e-9  # whole modules, none above the bound here
        # a second sync through the same groups (the steady state) is as exact
        m2 = sync.sync(version=2)
        assert m2["perf/weight_sync_buckets"] == m["perf/weight_sync_buckets"]
        (again,) = engine_logprobs(rollout, SEQS)
        assert worst(again, want) < 1e-4
        assert m["perf/weight_sync_wire_mb"] * 2**20 >= m["perf/weight_sync_gb"] * 1e9  # gloo: the bytes themselves
    finally:
        sync.close()

    # the same actors over ipc (the local route: each worker from the policy rank on its GPU):
    # first the engine's starting model A, then B again
    ipc = WeightSync(policy, rollout, make_cfg(TINY_MODEL, layout + ["rollout.weight_transport=ipc"]), placement=plan)
    try:
        assert ipc.backend == "ipc" and ipc.route.path == "local"  # each engine worker sits on a policy rank's GPU
        policy.load_hf(str(tmp_path / "engine_start"))
        want_a = policy_logprobs(policy, SEQS)
        assert worst(want_a, want) > 1e-2
        m3 = ipc.sync(version=3)
        (got_a,) = engine_logprobs(rollout, SEQS)
        assert worst(got_a, want_a) < 1e-4, worst(got_a, want_a)
        assert m3["perf/weight_sync_buckets"] == m["perf/weight_sync_buckets"]
        assert m3["perf/weight_sync_wire_mb"] * 2**20 < 0.02 * m3["perf/weight_sync_gb"] * 1e9, m3  # handles only
        policy.load_hf(str(tmp_path / "policy"))
        ipc.sync(version=4)
        (got_b,) = engine_logprobs(rollout, SEQS)
        assert all(torch.equal(x, y) for x, y in zip(got_b, after))  # the very engine that gloo's sync made
    finally:
        ipc.close()


def test_policy_pp2_into_two_tp1_engines_untied_memory(cluster_parts):
    from megatron_tppo.controller.weight_sync import WeightSync

    bucket_mb = 2
    cfg = make_cfg(MEDIUM, ["model.tie_word_embeddings=false", "model.qkv_bias=false", "model.arch=llama",
                            "parallel.policy.pipeline_parallel=2", "rollout.tensor_parallel=1", "rollout.num_engines=2",
                            f"rollout.weight_sync_bucket_mb={bucket_mb}"])
    policy, rollout, plan = cluster_parts(cfg)
    want = policy_logprobs(policy, SEQS)
    timeout = 20.0
    sync = WeightSync(policy, rollout, cfg, placement=plan, timeout_s=timeout)
    stopped = None
    try:
        # the local route: each engine's worker sits on a policy rank's GPU (stage 0's, stage 1's);
        # every bucket of the other stage reaches it over the policy's PP group first
        assert (sync.route.path, sync.backend) == ("local", "ipc") and len(sync.senders) == 2 and sync.world_size == 2
        m = sync.sync(version=1)
        for per_engine in engine_logprobs(rollout, SEQS):
            assert worst(per_engine, want) < 1e-4, worst(per_engine, want)
        assert m["perf/weight_relay_s"] > 0
        model_mb = m["perf/weight_sync_gb"] * 1e9 / 2**20
        assert model_mb > 20 * bucket_mb, model_mb
        # beyond the model a receiver holds a few buckets (vLLM's loader drops its last references
        # a few tensors late; measured: 2 in the steady state, 3 at the end), never the model
        assert 0 < m["mem/weight_sync_receiver_buffers_mb"] <= 3 * bucket_mb, m
        # a sender holds one bucket and the parameter being gathered (+ allocator slack); gathering
        # the whole stage at once would add about model_mb / 2 per stage here
        assert m["mem/weight_sync_sender_growth_mb"] < 3 * bucket_mb + 6, m

        # a real stall: engine 1's worker process stopped; the next sync's bucket fails on its
        # sender within the group's timeout, naming it, before the driver's own wait (timeout + 60)
        import os
        import signal
        import time

        import ray

        (device,) = ray.get(rollout.workers[1].call.remote("weight_transfer_devices"), timeout=60)
        stopped = device["pid"]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(Exception, match=r"engine 1 worker 0") as err:
            sync.sync(version=2)
        waited = time.perf_counter() - t0
        assert waited < timeout + 40, waited
        assert "did not get through within 20 s" in str(err.value), err.value
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
            sync.closed = True  # its groups are broken; the actors go with the fixture
        sync.close()

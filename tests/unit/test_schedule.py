"""The memory schedule (megatron_tppo/planning/schedule.py): bytes worked out by hand, the moves
between phases, refusals naming the phase, the 32B recipe on 4/8/16 nodes of H100 80 GB, and the
check of a controller's trace."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.planning import schedule as S
from megatron_tppo.planning.hardware import GPU, Host, gpu_memory_gib
from megatron_tppo.planning.layout import plan_placement
from megatron_tppo.planning.plan import PlanError, fill_layout, make_plan
from tests.unit.test_plan import EMB, LAYER, ONE_B  # the ~0.85B Llama-style model, counted by hand

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples/qwen2.5_32b/tppo.yaml")
GiB = 2 ** 30

# one node of 4 GPUs: policy TP2 on GPUs 0-1, critic TP2 on 2-3, two TP2 engines over all four
SMALL = ONE_B + ["parallel.device=cuda", "parallel.policy.tensor_parallel=2", "parallel.critic.tensor_parallel=2",
                 "parallel.policy.micro_batch_tokens=4096", "parallel.critic.micro_batch_tokens=4096",
                 "rollout.tensor_parallel=2", "rollout.num_engines=2", "rollout.colocate=true",
                 "rollout.num_slots=64", "rollout.window_tokens=1024", "rollout.max_response_tokens=2048",
                 "rollout.weight_sync_bucket_mb=256"]
CTX, NCCL, ASLEEP = 0.75 * GiB, 1.0 * GiB, 1.0 * GiB  # GPU()'s reserves


def small(*over):
    return load_config(None, SMALL + list(over))


def table(cfg, gpu=GPU(), util=0.5):
    return {(gp.phase, gp.gpu): gp for gp in S.phase_table(cfg, plan_placement(cfg, 1, 4), gpu, utilization=util)}


def test_updates_on_a_policy_gpu_by_hand():
    gp = table(small())[("updates", (0, 0))]
    n = 8 * LAYER + EMB + 2048  # TP2, one stage: half the layers and the vocab rows, both embeddings, final norm
    weights, grads, optim = 2 * n, 4 * n, 12 * n
    acts = 16 * 4096 * 2 * (4 * 2048 + (2 * 2048 + 2 * 512 + 3 * 5632) / 2)  # 16 layers stored, no recompute
    logits = 2 * 4 * 4096 * 32000 / 2
    trainer = weights + grads + optim + acts + logits
    engine = CTX + NCCL + ASLEEP  # an asleep TP2 worker: context, its TP group, the graph pool
    want = trainer * 1.05 + CTX + NCCL + engine
    assert gp.total == pytest.approx(want, rel=1e-12)
    items = {(h.component, h.item): h.bytes for h in gp.holdings}
    assert items[("policy rank 0", "optimizer")] == pytest.approx(optim)
    assert items[("engine 0 worker 0", "engine asleep")] == ASLEEP


def test_generation_and_sync_by_hand():
    t = table(small(), util=0.6)
    gen = t[("generation", (0, 2))]  # a critic GPU: the critic is off, the engine awake
    assert gen.total == pytest.approx(CTX + NCCL + 0.6 * GPU().memory_bytes + CTX + NCCL)
    sync = t[("sync", (0, 1))]  # a policy GPU: its weights and the buffers; the engine's weights awake
    n = 8 * LAYER + EMB + 2048
    buffers = 256 * 2 ** 20 + EMB * 2  # one bucket + the gathered embedding
    policy = (2 * n + buffers) * 1.05 + CTX + NCCL
    vllm_w = (16 * LAYER + 2 * EMB + 2048) * 2 / 2
    assert sync.total == pytest.approx(policy + CTX + NCCL + ASLEEP + vllm_w)
    assert t[("sync", (0, 2))].total == pytest.approx(CTX + NCCL + CTX + NCCL + ASLEEP + vllm_w)  # critic off


def test_max_utilization_is_what_generation_leaves():
    cfg = small()
    gpu = GPU()
    util = S.max_utilization(cfg, plan_placement(cfg, 1, 4), gpu)
    # generation: trainer context + NCCL, engine context + NCCL, the headroom; the rest is vLLM's
    want = (gpu.memory_bytes - 3 * GiB - 2 * (CTX + NCCL)) / gpu.memory_bytes
    assert util == pytest.approx(want)
    assert 0.9 < util < 0.95
    # at that value the fullest GPU in generation is exactly at the limit
    t = S.phase_table(cfg, plan_placement(cfg, 1, 4), gpu, utilization=util)
    assert S.check_fits(t, gpu) == []
    over = S.phase_table(cfg, plan_placement(cfg, 1, 4), gpu, utilization=util + 0.01)
    assert any(e.startswith("phase generation:") for e in S.check_fits(over, gpu))


def test_host_memory_by_hand():
    cfg = small()
    host = Host(memory_gib=512, object_store_gib=40)
    hold = S.host_table(cfg, plan_placement(cfg, 1, 4), host)[0]
    n = 8 * LAYER + EMB + 2048
    n_critic = 8 * LAYER + EMB // 2 + 2048 + 2048  # the value head (h -> 1) instead of the output layer
    buffers = 2 * 14 * n + 2 * 14 * n_critic  # per rank weights (2 B) + optimizer (12 B); gradients dropped
    backups = 4 * (16 * LAYER + 2 * EMB + 2048) * 2 / 2  # four engine workers' level-1 copies
    procs = 4 * 6 * GiB + 4 * 8 * GiB + 4 * GiB
    assert sum(h.bytes for h in hold) == pytest.approx(buffers + backups + procs + 40 * GiB)
    tiny_host = Host(memory_gib=64, object_store_gib=40)
    errors = S.check_host(S.host_table(cfg, plan_placement(cfg, 1, 4), tiny_host), tiny_host)
    assert len(errors) == 1 and "host memory of node 0" in errors[0] and "--host-mem-gb" in errors[0]


def test_moves_between_phases():
    cfg = small()
    p = {ph.name: ph for ph in S.phases(cfg)}
    assert S.transition(p["engine_start"], p["trainer_build"]) == [S.Action("rollout", "sleep", (2,))]
    assert S.transition(p["generation"], p["values"]) == [
        S.Action("rollout", "sleep", (2,)), S.Action("policy", "onload"), S.Action("critic", "onload")]
    assert S.transition(p["updates"], p["sync"]) == [
        S.Action("critic", "offload", ("params", "grads", "optimizer")),
        S.Action("policy", "offload", ("grads", "optimizer")), S.Action("rollout", "wake_up", ("weights",))]
    assert S.transition(p["sync"], p["generation"]) == [
        S.Action("policy", "offload", ("params",)), S.Action("rollout", "wake_up", ("kv_cache",))]
    assert S.transition(p["generation"], p["warmup_values"])[0] == S.Action("rollout", "sleep", (1,))
    assert S.transition(p["warmup_updates"], p["generation"])[-1] == S.Action("rollout", "wake_up",
                                                                             ("weights", "kv_cache"))
    assert S.transition(p["values"], p["updates"]) == []
    with pytest.raises(S.MemoryPlanError, match="level-2 sleep dropped the weights"):
        S.transition(p["updates"], p["generation"])  # generation straight after a level-2 sleep
    with pytest.raises(S.MemoryPlanError, match="engines: no move from awake to weights"):
        S.transition(p["generation"], p["sync"])
    with pytest.raises(S.MemoryPlanError, match="onload restores everything"):  # half a trainer back
        S.transition(p["first_sync"].__class__("x", "weights", "offloaded", "offloaded"),
                     p["first_sync"])
    # engines on their own GPUs: nothing ever moves
    own = small("rollout.colocate=false")
    names = S.run_phases(range(3), 1, {2, 3})
    q = {ph.name: ph for ph in S.phases(own)}
    assert all(S.transition(q[a], q[b]) == [] for a, b in zip(names, names[1:]))


@pytest.mark.parametrize("kw", [dict(), dict(resumed=True), dict(signal="generation"), dict(signal="updates"),
                                dict(saves={1, 2, 3}), dict(steps=range(0), signal="updates"),
                                dict(steps=range(0), signal="generation"), dict(steps=range(1), saves={1})])
def test_every_run_shape_is_a_sequence_of_possible_moves(kw):
    steps = kw.pop("steps", range(0, 3) if not kw.get("resumed") else range(2, 4))
    seq = S.run_phases(steps, 1, kw.pop("saves", {2}), **kw)
    S.check_sequence(small(), seq)
    assert seq[:2] == ["engine_start", "trainer_build"]  # engines start alone and sleep first
    if not steps and kw.get("signal") == "updates":  # cut in a critic warm-up step: engines at level 1
        assert seq[-3:] == ["warmup_values", "warmup_updates", "signal_warmup_updates"]


def _fake_trace(cfg, names, observe):
    recs, prev = [], None
    for n in names:
        acts = [] if prev is None else [a.to_json() for a in S.transition(S.phase(cfg, prev), S.phase(cfg, n))]
        recs.append({"from": prev, "to": n, "actions": acts, "observed": observe(S.phase(cfg, n))})
        prev = n
    return recs


def _observe(ph):
    trainer = {"resident": dict(offloaded=[], dropped=[]), "params": dict(offloaded=["optimizer"], dropped=["grads"]),
               "offloaded": dict(offloaded=["optimizer", "params"], dropped=["grads"])}
    engine = {"awake": dict(asleep=[], no_weights=None), "weights": dict(asleep=["kv_cache"], no_weights="x"),
              "asleep1": dict(asleep=["kv_cache", "weights"], no_weights=None),
              "asleep2": dict(asleep=["kv_cache", "weights"], no_weights="sleep(level=2) discarded them")}
    out = {"rollout": [engine[ph.engine]] * 2}
    for role in ("policy", "critic"):  # a trainer is attached once built: a build phase sees it absent
        state = getattr(ph, role)
        out[role] = None if state == "absent" or getattr(ph, f"{role}_work") == "build" else [
            dict(trainer[state], unscheduled_onloads=0)] * 2
    return out


def test_check_trace_accepts_the_schedule_and_catches_a_reorder():
    cfg = small()
    names = S.run_phases(range(4), 1, {2, 4})
    assert S.check_trace(cfg, _fake_trace(cfg, names, _observe)) == [names]
    # a controller that built the trainers next to awake engines: the engines report awake
    bad = _fake_trace(cfg, names, _observe)
    bad[1]["observed"]["rollout"] = [dict(asleep=[], no_weights=None)] * 2
    with pytest.raises(S.MemoryPlanError, match="record 1 .*rollout reports awake, the schedule says asleep2"):
        S.check_trace(cfg, bad)
    # a call the schedule did not ask for
    bad = _fake_trace(cfg, names, _observe)
    bad[5]["actions"] = bad[5]["actions"][1:]
    with pytest.raises(S.MemoryPlanError, match="record 5"):
        S.check_trace(cfg, bad)
    # a save that onloaded a trainer by itself
    bad = _fake_trace(cfg, names, _observe)
    bad[7]["observed"]["critic"] = [dict(offloaded=[], dropped=[], unscheduled_onloads=1)] * 2
    with pytest.raises(S.MemoryPlanError, match="critic reports unscheduled onload"):
        S.check_trace(cfg, bad)


# the split layout the 32B recipe had before it shared its trainers: TP8 x PP2 x DP1 each on 16 GPUs
SPLIT_32B = ["parallel.trainers=split", "parallel.policy.pipeline_parallel=2", "parallel.policy.data_parallel=1",
             "parallel.critic.pipeline_parallel=2", "parallel.critic.data_parallel=1"]


@pytest.mark.parametrize("nodes", [4, 8, 16])
@pytest.mark.parametrize("layout", ["recipe", "split"])
def test_32b_recipe_fits_every_phase_on_h100_80gb(nodes, layout):
    cfg = load_config(RECIPE, SPLIT_32B if layout == "split" else [])
    fill_layout(cfg, nodes * 8)
    cfg.validate()
    gpu = GPU(memory_gib=gpu_memory_gib(80))
    plan = make_plan(cfg, nodes, 8, gpu)
    peaks = S.peaks(plan.memory)
    assert list(peaks) == [p.name for p in S.phases(cfg)]
    assert all(gp.total <= gpu.memory_bytes - gpu.headroom_gib * GiB for gp in peaks.values())
    # the phases that once died: engines at 85% next to a trainer build, a save next to awake engines
    build, save = ("trainer_build", "checkpoint_save") if layout == "split" else ("trainer_build@policy",
                                                                                 "checkpoint_save@policy")
    assert peaks[build].total < 50 * GiB and peaks[save].total < 70 * GiB
    assert plan.numbers["host_peak_gib"] < Host().memory_gib


def test_a_config_that_does_not_fit_is_refused_with_its_phase():
    # split, policy PP1 x DP2 on 16 GPUs: a stage holds all 64 layers' weights, gradients and Adam state
    c = load_config(RECIPE, SPLIT_32B + ["parallel.policy.pipeline_parallel=1", "parallel.policy.data_parallel=2"])
    with pytest.raises(PlanError, match=r"phase updates: GPU \d of node [01] needs .*largest: policy rank \d+ optimizer"):
        make_plan(c, 4, 8)
    # an engine budget that leaves no room: generation named, with the field
    c = load_config(RECIPE, ["rollout.gpu_memory_utilization=0.97"])
    with pytest.raises(PlanError, match=r"phase generation: .*largest: engine \d+ worker \d budget") as err:
        make_plan(c, 4, 8)
    assert "rollout.gpu_memory_utilization=0.97" in str(err.value)
    # an H200 takes what an H100 refuses
    c = load_config(RECIPE, ["parallel.policy.recompute=none", "parallel.policy.micro_batch_tokens=16384"])
    with pytest.raises(PlanError, match="phase updates"):
        make_plan(c, 4, 8, GPU(memory_gib=gpu_memory_gib(80)))
    make_plan(c, 4, 8, GPU(memory_gib=gpu_memory_gib(141)))


def test_plan_json_is_json_alone_and_carries_the_phase_table():
    r = subprocess.run([sys.executable, "-m", "megatron_tppo.plan", "--config", RECIPE, "--nodes", "8", "--fill",
                        "--gpu-mem-gb", "80", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # nothing else on stdout
    # the recipe's shared trainers, TP8 x PP1 x DP4 on 32 GPUs, filled to 64
    assert doc["overrides"] == ["parallel.policy.data_parallel=8", "parallel.critic.data_parallel=8",
                                "rollout.num_engines=16"]
    names = [p.name for p in S.SHARED]
    assert list(doc["memory_peaks"]) == names
    assert all(p["total_gib"] < 79.6 for p in doc["memory_peaks"].values())
    assert len(doc["memory"]) == 64 * len(names)  # every phase on every GPU
    assert doc["startup"]["total_s"] > 0 and doc["waits"]["engine_start_s"] >= 300
    assert set(doc["host_memory"]) == {str(n) for n in range(8)}
    text = subprocess.run([sys.executable, "-m", "megatron_tppo.plan", "--config", RECIPE, "--nodes", "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    assert "memory per phase" in text and "start-up (projected)" in text and "host memory at its peak" in text


def test_engine_utilization_is_the_schedules_or_checked_against_it():
    from megatron_tppo.config import ConfigError

    cfg = small()
    place = plan_placement(cfg, 1, 4)
    total = GPU().memory_bytes
    assert S.engine_utilization(cfg, place, total) == S.max_utilization(cfg, place, GPU())
    assert S.engine_utilization(small("rollout.gpu_memory_utilization=0.5"), place, total) == 0.5
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization=0.99 .*at most 0\.9"):
        S.engine_utilization(small("rollout.gpu_memory_utilization=0.99"), place, total)
    # an H200 leaves the engines more
    assert S.engine_utilization(cfg, place, gpu_memory_gib(141) * GiB) > S.engine_utilization(cfg, place, total)


# ---------------------------------------------------------------------------------------------
# Shared trainers (parallel.trainers=shared): both on the same GPUs, taking turns
# ---------------------------------------------------------------------------------------------

# one node of 2 GPUs: policy TP2 and critic TP2 both on GPUs 0-1, one TP2 engine over them
SHARED_SMALL = ["parallel.trainers=shared", "rollout.num_engines=1"]
SHARED_32B = ["parallel.trainers=shared", "parallel.policy.pipeline_parallel=1", "parallel.policy.data_parallel=4",
              "parallel.critic.pipeline_parallel=1", "parallel.critic.data_parallel=4"]
# by hand from the module docstring: (name, engines, policy, critic, policy's work, critic's work)
SHARED_PHASES = [
    ("engine_start", "awake", "absent", "absent", None, None),
    ("trainer_build@critic", "asleep2", "absent", "resident", None, "build"),
    ("trainer_build@policy", "asleep2", "resident", "offloaded", "build", None),
    ("checkpoint_load@critic", "asleep2", "offloaded", "resident", None, "load"),
    ("checkpoint_load@policy", "asleep2", "resident", "offloaded", "load", None),
    ("resume@critic", "asleep2", "offloaded", "resident", None, "resume"),
    ("resume@policy", "asleep2", "resident", "offloaded", "resume", None),
    ("first_sync", "weights", "params", "offloaded", "gather", None),
    ("generation", "awake", "offloaded", "offloaded", None, None),
    ("values", "asleep2", "offloaded", "resident", None, "forward"),
    ("updates@critic", "asleep2", "offloaded", "resident", None, "train"),
    ("updates@policy", "asleep2", "resident", "offloaded", "train", None),
    ("sync", "weights", "params", "offloaded", "gather", None),
    ("warmup_values", "asleep1", "offloaded", "resident", None, "forward"),
    ("warmup_updates", "asleep1", "offloaded", "resident", None, "train"),
    ("checkpoint_save@critic", "asleep1", "offloaded", "resident", None, "save"),
    ("checkpoint_save@policy", "asleep1", "resident", "offloaded", "save", None),
    ("signal_generation@critic", "asleep1", "offloaded", "resident", None, "save"),
    ("signal_generation@policy", "asleep1", "resident", "offloaded", "save", None),
    ("signal_updates@critic", "asleep2", "offloaded", "resident", None, "save"),
    ("signal_updates@policy", "asleep2", "resident", "offloaded", "save", None),
    ("signal_warmup_updates@critic", "asleep1", "offloaded", "resident", None, "save"),
    ("signal_warmup_updates@policy", "asleep1", "resident", "offloaded", "save", None),
]


def shared_small(*over):
    return small(*SHARED_SMALL, *over)


def shared_32b():
    cfg = load_config(RECIPE, SHARED_32B)
    cfg.validate()
    return cfg


def test_shared_phases_take_turns():
    got = [(p.name, p.engine, p.policy, p.critic, p.policy_work, p.critic_work) for p in S.phases(shared_small())]
    assert got == SHARED_PHASES
    assert [p.name for p in S.phases(small())] == list(S.PHASE_NAMES)  # split: one phase each, as before
    assert S.turn_name(shared_small(), "updates", "critic") == "updates@critic"
    assert S.turn_name(shared_small(), "values", "critic") == "values"  # only the critic works there
    assert S.turn_name(small(), "updates", "policy") == "updates"
    with pytest.raises(ValueError, match="taken in turns"):
        S.turn_name(shared_small(), "updates", None)


def test_shared_moves_by_hand():
    p = {ph.name: ph for ph in S.phases(shared_small())}
    off_all = ("params", "grads", "optimizer")
    assert S.transition(p["engine_start"], p["trainer_build@critic"]) == [S.Action("rollout", "sleep", (2,))]
    # the policy is built by its constructor while the critic waits in host memory
    assert S.transition(p["trainer_build@critic"], p["trainer_build@policy"]) == [
        S.Action("critic", "offload", off_all)]
    assert S.transition(p["trainer_build@policy"], p["checkpoint_load@critic"]) == [
        S.Action("policy", "offload", off_all), S.Action("critic", "onload")]
    assert S.transition(p["checkpoint_load@policy"], p["first_sync"]) == [
        S.Action("policy", "offload", ("grads", "optimizer")), S.Action("rollout", "wake_up", ("weights",))]
    assert S.transition(p["generation"], p["values"]) == [S.Action("rollout", "sleep", (2,)),
                                                         S.Action("critic", "onload")]
    assert S.transition(p["values"], p["updates@critic"]) == []
    assert S.transition(p["updates@critic"], p["updates@policy"]) == [
        S.Action("critic", "offload", off_all), S.Action("policy", "onload")]
    assert S.transition(p["updates@policy"], p["sync"]) == [
        S.Action("policy", "offload", ("grads", "optimizer")), S.Action("rollout", "wake_up", ("weights",))]
    assert S.transition(p["warmup_updates"], p["generation"]) == [
        S.Action("critic", "offload", off_all), S.Action("rollout", "wake_up", ("weights", "kv_cache"))]
    assert S.transition(p["checkpoint_save@policy"], p["generation"]) == [
        S.Action("policy", "offload", off_all), S.Action("rollout", "wake_up", ("weights", "kv_cache"))]
    # the sync straight after the critic's turn: the policy would have to come back half
    with pytest.raises(S.MemoryPlanError, match="policy: no move from offloaded to params"):
        S.transition(p["updates@critic"], p["sync"])


def test_run_phases_shared_by_hand():
    seq = S.run_phases(range(2), 1, {2}, shared=True)
    assert seq == ["engine_start", "trainer_build@critic", "trainer_build@policy", "checkpoint_load@critic",
                   "checkpoint_load@policy", "first_sync", "generation",
                   "warmup_values", "warmup_updates", "generation",  # step 1: the critic's warm-up
                   "values", "updates@critic", "updates@policy", "sync", "generation",
                   "checkpoint_save@critic", "checkpoint_save@policy"]  # the last step's save ends it
    assert S.run_phases(range(2), 1, {2}) == [n.split("@")[0] for i, n in enumerate(seq)
                                              if not n.endswith("@policy")]  # split: one phase per turn pair
    resumed = S.run_phases(range(2, 3), 1, set(), resumed=True, signal="updates", shared=True)
    assert resumed[3:5] == ["resume@critic", "resume@policy"]
    assert resumed[-5:] == ["values", "updates@critic", "updates@policy", "signal_updates@critic",
                            "signal_updates@policy"]


@pytest.mark.parametrize("kw", [dict(), dict(resumed=True), dict(signal="generation"), dict(signal="updates"),
                                dict(saves={1, 2, 3}), dict(steps=range(0), signal="updates"),
                                dict(steps=range(0), signal="generation"), dict(steps=range(1), saves={1})])
def test_every_shared_run_shape_is_a_sequence_of_possible_moves(kw):
    steps = kw.pop("steps", range(0, 3) if not kw.get("resumed") else range(2, 4))
    seq = S.run_phases(steps, 1, kw.pop("saves", {2}), shared=True, **kw)
    S.check_sequence(shared_small(), seq)
    with pytest.raises(KeyError, match="unknown phase 'trainer_build'"):  # shared trainers have turns instead
        S.check_sequence(shared_small(), S.run_phases(steps, 1, {2}, **kw))


def test_shared_bytes_by_hand():
    cfg = shared_small()
    t = {(gp.phase, gp.gpu): gp for gp in S.phase_table(cfg, plan_placement(cfg, 1, 2), GPU(), utilization=0.5)}
    assert {g for _, g in t} == {(0, 0), (0, 1)}
    n = 8 * LAYER + EMB + 2048
    n_critic = 8 * LAYER + EMB // 2 + 2048 + 2048  # the value head (h -> 1) instead of the output layer
    acts = 16 * 4096 * 2 * (4 * 2048 + (2 * 2048 + 2 * 512 + 3 * 5632) / 2)
    logits = 2 * 4 * 4096 * 32000 / 2
    engine = CTX + NCCL + ASLEEP  # the asleep TP2 worker
    idle = CTX + NCCL  # an offloaded trainer rank keeps its context and communicators
    policy_train = (18 * n + acts + logits) * 1.05 + CTX + NCCL
    critic_train = (18 * n_critic + acts) * 1.05 + CTX + NCCL
    assert t[("updates@policy", (0, 1))].total == pytest.approx(policy_train + idle + engine, rel=1e-12)
    assert t[("updates@critic", (0, 0))].total == pytest.approx(critic_train + idle + engine, rel=1e-12)
    gen = t[("generation", (0, 0))]
    assert gen.total == pytest.approx(2 * idle + CTX + NCCL + 0.5 * GPU().memory_bytes)
    build = t[("trainer_build@critic", (0, 0))]  # the policy is not built yet: nothing of it there
    assert build.total == pytest.approx(18 * n_critic * 1.05 + CTX + NCCL + engine, rel=1e-12)
    assert not any(h.component.startswith("policy") for h in build.holdings)
    # generation leaves the engine what three processes' contexts and communicators leave
    util = S.max_utilization(cfg, plan_placement(cfg, 1, 2), GPU())
    assert util == pytest.approx((GPU().memory_bytes - 3 * GiB - 3 * (CTX + NCCL)) / GPU().memory_bytes)


def test_shared_host_memory_counts_both_trainers_buffers():
    cfg = shared_small()
    host = Host(memory_gib=512, object_store_gib=40)
    hold = S.host_table(cfg, plan_placement(cfg, 1, 2), host)
    assert set(hold) == {0}
    n = 8 * LAYER + EMB + 2048
    n_critic = 8 * LAYER + EMB // 2 + 2048 + 2048
    buffers = 2 * 14 * n + 2 * 14 * n_critic  # two policy and two critic ranks on the node's two GPUs
    backups = 2 * (16 * LAYER + 2 * EMB + 2048) * 2 / 2  # the engine's two workers' level-1 copies
    procs = 4 * 6 * GiB + 2 * 8 * GiB + 4 * GiB
    assert sum(h.bytes for h in hold[0]) == pytest.approx(buffers + backups + procs + 40 * GiB)
    assert sum(1 for h in hold[0] if h.item == "offload buffer") == 4


def _fake_shared_trace(names):
    cfg = shared_small()
    return cfg, _fake_trace(cfg, names, _observe)


def test_check_trace_takes_every_turn():
    names = S.run_phases(range(4), 1, {2, 4}, shared=True)
    cfg, recs = _fake_shared_trace(names)
    assert S.check_trace(cfg, recs) == [names]
    # a periodic save that skipped the policy's turn: each move is possible, the turn is missing
    i = names.index("checkpoint_save@policy")
    _, recs = _fake_shared_trace(names[:i] + names[i + 1:])
    with pytest.raises(S.MemoryPlanError, match=rf"record {i} \(checkpoint_save@critic -> generation\): the "
                                                r"policy's turn of checkpoint_save is missing"):
        S.check_trace(cfg, recs)
    # the policy's update without the critic's before it
    i = names.index("updates@critic")
    _, recs = _fake_shared_trace(names[:i] + names[i + 1:])
    with pytest.raises(S.MemoryPlanError, match=rf"record {i} \(values -> updates@policy\): the policy's turn of "
                                                r"updates without the critic's first"):
        S.check_trace(cfg, recs)
    # a process may end inside a turn (killed): what it did is still checked
    cut = names[:names.index("updates@critic") + 1]
    assert S.check_trace(cfg, _fake_shared_trace(cut)[1]) == [cut]
    # an observed state that is not the turn's: both trainers resident in the policy's update
    _, recs = _fake_shared_trace(names)
    i = names.index("updates@policy")
    recs[i]["observed"]["critic"] = [dict(offloaded=[], dropped=[], unscheduled_onloads=0)] * 2
    with pytest.raises(S.MemoryPlanError, match=f"record {i} .*critic reports resident, the schedule says offloaded"):
        S.check_trace(cfg, recs)


def test_32b_shared_fits_every_phase_on_h100_80gb():
    cfg = shared_32b()
    gpu = GPU(memory_gib=gpu_memory_gib(80))
    place = plan_placement(cfg, 4, 8)
    util = S.max_utilization(cfg, place, gpu)
    tab = S.phase_table(cfg, place, gpu, utilization=util)
    print("\n" + "\n".join(S.format_peaks(tab, gpu)))
    assert S.check_fits(tab, gpu) == []
    limit = gpu.memory_bytes - gpu.headroom_gib * GiB
    peaks = S.peaks(tab)
    assert list(peaks) == [p[0] for p in SHARED_PHASES]
    assert all(gp.total <= limit for gp in peaks.values())
    # no GPU ever holds more than one trainer's weights, gradients or optimizer state
    for gp in tab:
        holders = {h.component.split()[0] for h in gp.holdings if h.item in ("grads", "optimizer") and h.bytes > 0}
        assert len(holders) <= 1, (gp.phase, gp.gpu, holders)
    # by hand: policy rank 0 (TP8, one stage, DP4): 1/8 of 64 layers, the embedding and the output layer
    layer = 2 * 5120 * 5120 + 2 * 5120 * 1024 + (5120 + 2 * 1024) + 3 * 5120 * 27648 + 2 * 5120
    n = (64 * layer + 2 * 152064 * 5120) / 8 + 5120
    items = {(h.component, h.item): h.bytes for h in peaks["updates@policy"].holdings}
    assert items[("policy rank 0", "weights")] == 2 * n and items[("policy rank 0", "grads")] == 4 * n
    assert items[("policy rank 0", "optimizer")] == pytest.approx(12 * n / 4)
    assert ("critic rank 0", "weights") not in items  # offloaded: context and communicators only
    assert 9 * n / GiB == pytest.approx(34.3, abs=0.05)  # the ~40 GB per GPU that the policy alone holds
    assert 69 * GiB < peaks["updates@policy"].total < limit


def test_turns_are_what_makes_shared_fit():
    cfg = shared_32b()
    gpu = GPU(memory_gib=gpu_memory_gib(80))
    place = plan_placement(cfg, 4, 8)
    # the split schedule's phases on the shared GPUs: both trainers resident at once
    both = S.phase_table(cfg, place, gpu, utilization=0.5, only=S.COLOCATED)
    over = {e.split(":")[0] for e in S.check_fits(both, gpu)}
    assert {"phase values", "phase updates", "phase checkpoint_save"} <= over
    # even idle: policy (~34 GiB) and critic (~33 GiB) states together exceed 76.6 GiB
    idle = S.Phase("both resident", "asleep2", "resident", "resident")
    err = S.check_fits(S.phase_table(cfg, place, gpu, utilization=0.5, only=[idle]), gpu)
    assert len(err) == 1 and err[0].startswith("phase both resident: GPU 0 of node 0 needs 77.5 GiB > 76.6 GiB")

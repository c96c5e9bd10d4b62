"""Shared trainers (``parallel.trainers=shared``) on a real run: the policy, the critic and the engine
on the same GPU bundle (the session cluster's logical GPUs), taking turns as the memory schedule
says, and training exactly as the split run does.

Three steps (a critic warm-up step, then two), a periodic save after step 2 and the final one
after step 3. Weights go over gloo, the path the split run takes, so the comparison is of the
turns alone.
"""
import json

import pytest

from megatron_tppo.planning.schedule import run_phases
from tests.e2e.conftest import RESUME_COMMON, check_memory_trace, run_tiny, saves_of
from tests.e2e.test_faults import assert_same_metrics

SHARED = ["parallel.trainers=shared", "rollout.weight_transport=gloo", "steps=3", "checkpoint.save_every=2"]


@pytest.mark.slow
def test_shared_trainers_take_turns_and_train_as_split(straight_run, tiny_model, tmp_path):
    _, straight = straight_run
    cfg, tb = run_tiny(tmp_path, tiny_model, RESUME_COMMON + SHARED)
    # every actor on the first GPU's bundle, a third of it each
    actors = json.loads((tmp_path / "actors.json").read_text())
    assert sorted(a["group"] for a in actors) == ["critic", "policy", "rollout engine"]
    assert all(a["gpus"] == [[0, 0]] for a in actors), actors
    # the memory schedule, call for call: every phase both trainers work in taken in turns
    steps = range(cfg.steps)
    expected = run_phases(steps, cfg.algorithm.critic_warmup_steps, saves_of(cfg, steps), shared=True)
    assert "updates@critic" in expected and "checkpoint_save@policy" in expected
    check_memory_trace(cfg, tmp_path, [expected])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    # the idle trainer offloaded and restored every step, the updates one after the other: the
    # same numbers as the split run (its trainers never leave the device)
    assert [s for s, _ in tb["rollout/finished_count"]] == [1, 2, 3]
    assert max(v for _, v in tb["rollout/logprob_mismatch_max"]) < 1e-4
    assert_same_metrics(straight, tb, range(1, 4))

"""A stop signal acted on between phases, not only at the end of a step (driver process, real run).

``TPPO_TEST_HOLD_AT=<phase>:<step>`` makes the driver wait at that phase boundary until the signal
has arrived (it writes ``held_<phase>_<step>`` first), so the signal lands inside the phase
deterministically:
* during step 2's generation: the step is undone, step 1's state is checkpointed before any update,
  and the resumed run (which regenerates step 2) matches the uninterrupted one;
* after step 2's updates: the sync and evaluation are skipped, step 2 is checkpointed, same result;
* after step 1's updates, a critic warm-up step (its engines sleep at level 1): the same.
"""
from __future__ import annotations

import signal

import pytest

from megatron_tppo.planning.schedule import run_phases
from tests.e2e.conftest import RESUME_COMMON, check_memory_trace, run_tiny, saves_of
from tests.e2e.test_faults import assert_same_metrics

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("phase,step,saved", [("generation", 2, 1), ("updates", 2, 2), ("updates", 1, 1)],
                         ids=["generation", "updates", "updates-of-a-critic-warmup-step"])
def test_signal_between_phases_checkpoints_and_resumes(straight_run, driver, tiny_model, tmp_path, monkeypatch,
                                                       phase, step, saved):
    _, straight = straight_run
    monkeypatch.setenv("TPPO_TEST_HOLD_AT", f"{phase}:{step}")
    d = driver(tmp_path, RESUME_COMMON)  # save_every=0: only the signal makes it checkpoint
    d.wait_for(tmp_path / f"held_{phase}_{step}")
    d.signal(signal.SIGUSR1)
    assert d.wait(timeout_s=300) == 0, d.log()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{saved:08d}"], d.log()
    log = d.log()
    if phase == "generation":
        assert "SIGUSR1 received during step 2's generation: checkpointed step 1" in log, log
        assert not (tmp_path / "rollouts" / "step_00000002.jsonl").exists()  # step 2 never trained
    else:
        assert f"stopping after step {step} (after its updates, before the sync)" in log, log
    monkeypatch.delenv("TPPO_TEST_HOLD_AT")
    cfg, resumed = run_tiny(tmp_path, tiny_model, RESUME_COMMON + ["checkpoint.resume=true"])
    assert_same_metrics(straight, resumed, range(saved + 1, 5))
    # the memory schedule, call for call: the signalled process stopped in its signal phase; the
    # resumed one loaded the checkpoint (with optimizer state) in the resume phase
    warm = cfg.algorithm.critic_warmup_steps
    check_memory_trace(cfg, tmp_path, [run_phases(range(step - 1), warm, set(), signal=phase),
                                       run_phases(range(saved, 4), warm, saves_of(cfg, range(saved, 4)), resumed=True)])

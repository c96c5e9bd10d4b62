"""Faults caused for real on a running T-PPO job (Ray cluster, megatron-core, vLLM), and resume.

* checkpoint at step 2 and resume to 4 == 4 straight steps;
* SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (scancel, preemption) to a driver
  process: it finishes the step, checkpoints, exits 0; the resumed run matches the straight one;
* ``kill -9`` of the driver while it writes step 3's checkpoint, with the newest whole checkpoint
  (step 2) then found corrupt: resume ignores the partial one, falls back to step 1, and ends with
  the straight run's metrics and responses; no prompt lost or duplicated (counted);
* a rollout engine (under a driver process: exit 1, how to resume) or a policy rank (of TP=2)
  killed with SIGKILL: the run stops within seconds, naming it;
* a reward that raises or hangs: those samples score 0 and are counted on TensorBoard.

Tolerance for "the same metrics": relative 1e-4 (fp32 on CPU; the runs are bit-identical in
practice, the tolerance only absorbs summation order in the loss reductions).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from megatron_tppo.monitoring import read_scalars
from tests.e2e.conftest import RESUME_COMMON, run_tiny
from tests.e2e.faulty_reward import outcome

RESUME_TAGS = ["policy/loss", "policy/grad_norm", "critic/value_loss", "rollout/generated_tokens",
               "rollout/response_length_mean", "rollout/logprob_mismatch_mean", "rollout/prompts_taken"]
pytestmark = pytest.mark.slow


def assert_same_metrics(straight: dict, resumed: dict, steps) -> None:
    for tag in RESUME_TAGS:
        want, got = dict(straight[tag]), dict(resumed[tag])  # got: the event files of every part
        for step in steps:
            if step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (tag, step)


def read_dumps(out: Path) -> dict[int, list[dict]]:
    return {int(p.stem.split("_")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((out / "rollouts").glob("step_*.jsonl"))}


def assert_prompts_accounted(out: Path, tb: dict, samples_per_prompt: int) -> None:
    """Every (prompt, sample) finished at most once across all steps' dumps, and
    prompts_taken x samples_per_prompt == finished + in flight + pending at the end."""
    dumps = read_dumps(out)
    keys = [(r["prompt_uid"], r["sample"]) for rows in dumps.values() for r in rows]
    assert len(keys) == len(set(keys)), "a sample finished twice"
    last = max(dumps)
    taken = dict(tb["rollout/prompts_taken"])[last]
    assert all(uid < taken for uid, _ in keys)
    in_flight, pending = dict(tb["rollout/in_flight"])[last], dict(tb["rollout/pending"])[last]
    assert taken * samples_per_prompt == len(keys) + in_flight + pending


# SIGUSR1 (Slurm's warning) is sent by tests/e2e/test_phase_signals.py, within a step's phases
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_signal_checkpoints_and_exits_then_resumes(straight_run, driver, tiny_model, tmp_path, sig):
    _, straight = straight_run
    d = driver(tmp_path, RESUME_COMMON)  # save_every=0: only the signal makes it checkpoint
    d.wait_for(tmp_path / "rollouts" / "step_00000001.jsonl")
    d.signal(sig)
    assert d.wait(timeout_s=300) == 0, d.log()
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file(), d.log()
    stopped_at = int(ckpts[0].name.split("_")[1])
    assert 1 <= stopped_at < 4
    # the signal lands after a step or between its phases (test_phase_signals.py pins each phase)
    assert (f"{sig.name} received: checkpointed and stopping after step {stopped_at}" in d.log()
            or f"{sig.name} received during step {stopped_at + 1}'s generation: checkpointed step {stopped_at}"
            in d.log()), d.log()
    _, resumed = run_tiny(tmp_path, tiny_model, RESUME_COMMON + ["checkpoint.resume=true"])
    assert_same_metrics(straight, resumed, range(stopped_at + 1, 5))


def test_kill9_driver_mid_step_then_resume_loses_no_prompt(straight_run, driver, tiny_model, tmp_path, capsys):
    straight_dir, straight = straight_run
    d = driver(tmp_path, RESUME_COMMON + ["checkpoint.save_every=1", "checkpoint.keep_last=3"])
    # killed while step 3's checkpoint is being written (the step's work is done, its checkpoint
    # is not whole): the nastiest moment, as the run must not count step 3 as done
    d.wait_for(tmp_path / "checkpoints" / ".step_00000003.tmp")
    d.signal(signal.SIGKILL)
    assert d.wait(timeout_s=30) == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()
    # and the newest whole checkpoint then turns out corrupt (truncated policy shards)
    policy_files = sorted((tmp_path / "checkpoints" / "step_00000002" / "policy").rglob("*.distcp"))
    assert policy_files
    for f in policy_files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    capsys.readouterr()
    _, resumed = run_tiny(tmp_path, tiny_model, RESUME_COMMON + ["checkpoint.keep_last=3", "checkpoint.resume=true"])
    log = capsys.readouterr().out
    assert "step_00000002 failed to load" in log and "resumed from" in log and "step_00000001 at step 1" in log, log
    assert_same_metrics(straight, resumed, (2, 3, 4))
    # the same responses, step by step, as the run that was never interrupted
    strip = lambda rows: sorted((r["prompt_uid"], r["sample"], r["response"], r["reward"]) for r in rows)  # noqa: E731
    got, want = read_dumps(tmp_path), read_dumps(straight_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert strip(got[step]) == strip(want[step]), step
    assert_prompts_accounted(tmp_path, read_scalars(tmp_path / "tensorboard"), samples_per_prompt=4)


def _kill_when_running(out: Path, group: str, rank: int, box: dict) -> None:
    """Background: once step 1 is done, SIGKILL the actor ``group``/``rank`` (from actors.json)."""
    deadline = time.time() + 600
    while not (out / "rollouts" / "step_00000001.jsonl").exists():
        if time.time() > deadline or box.get("stop"):
            return
        time.sleep(0.1)
    actors = json.loads((out / "actors.json").read_text())
    pid = next(a["pid"] for a in actors if a["group"] == group and a["rank"] == rank)
    box["pid"] = pid
    os.kill(pid, signal.SIGKILL)
    box["killed_at"] = time.monotonic()


def test_rollout_engine_death_stops_the_driver_naming_it(driver, tmp_path):
    """The CLI path: the driver process exits 1 within seconds, names the engine, says how to resume."""
    d = driver(tmp_path, ["steps=20", "data.eval_every=0", "checkpoint.save_every=1"])
    d.wait_for(tmp_path / "rollouts" / "step_00000002.jsonl")
    pid = next(a["pid"] for a in json.loads((tmp_path / "actors.json").read_text()) if a["group"] == "rollout engine")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert d.wait(timeout_s=120) == 1, d.log()
    waited = time.monotonic() - t0
    log = d.log()
    assert "run stopped: rollout." in log and f"rollout engine rank 0 (pid {pid} on " in log, log
    assert "with checkpoint.resume=true" in log and "checkpoints/step_0000000" in log, log
    assert waited < 60, f"the driver exited {waited:.1f} s after the kill"
    print(f"rollout engine killed; driver exited {waited:.1f} s later")


def test_trainer_rank_death_stops_the_run_naming_it(ray_cluster, tiny_model, tmp_path):
    """Policy rank 1 of 2 (TP=2) killed while rank 0 may be waiting for it in a collective."""
    from megatron_tppo.controller.errors import ActorDiedError

    box: dict = {}
    killer = threading.Thread(target=_kill_when_running, args=(tmp_path, "policy", 1, box), daemon=True)
    killer.start()
    try:
        with pytest.raises(ActorDiedError) as err:
            run_tiny(tmp_path, tiny_model, ["parallel.policy.tensor_parallel=2", "steps=20", "data.eval_every=0"])
    finally:
        box["stop"] = True
        killer.join(5)
    waited = time.monotonic() - box["killed_at"]
    assert f"policy rank 1 (pid {box['pid']} on " in str(err.value)
    assert waited < 60, f"noticed {waited:.1f} s after the kill"
    print(f"policy rank 1 killed; run stopped {waited:.1f} s later: {err.value}")


def test_reward_that_raises_or_hangs_scores_zero_and_is_counted(ray_cluster, tiny_model, tmp_path):
    # responses of at most one window: every sample finishes in its step (24 scored in 3 steps)
    _, tb = run_tiny(tmp_path, tiny_model, ["data.reward=tests.e2e.faulty_reward:reward", "data.reward_timeout_s=1",
                                             "data.eval_every=0", "rollout.max_response_tokens=12"])
    rows = [r for rows in read_dumps(tmp_path).values() for r in rows]
    kinds = [outcome(r["response"]) for r in rows]
    assert "raise" in kinds and "hang" in kinds, "pick another checksum rule: no raise/hang in this run"
    assert tb["health/reward_error"][-1][1] == kinds.count("raise")
    assert tb["health/reward_timeout"][-1][1] == kinds.count("hang")
    assert all(r["reward"] == 0.0 for r, k in zip(rows, kinds) if k != "ok")

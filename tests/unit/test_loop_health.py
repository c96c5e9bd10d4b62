"""The loop's bookkeeping of skipped updates: the engine skips a NaN/inf-loss update for real
(tests/distributed/test_nonfinite_loss.py) and reports ``nonfinite_loss``; the loop counts those
steps, stops after ``algorithm.max_nonfinite_updates`` in a row, and keeps the totals across a
checkpoint."""
import pytest

from megatron_tppo.algorithms.window_pool import Prompt
from megatron_tppo.config_io import load_config
from megatron_tppo.controller.errors import NonFiniteLossError, RunAborted
from megatron_tppo.controller.loop import Task, TPPOLoop
from megatron_tppo.monitoring import NullLogger


def _loop(limit: int) -> TPPOLoop:
    cfg = load_config("examples/tiny_cpu.yaml", [f"algorithm.max_nonfinite_updates={limit}"])
    prompts = iter([Prompt(i, [1, 2, 3]) for i in range(1000)])
    task = Task(prompts=prompts, eval_prompts=[], decode=str, score=lambda text, meta: (0.0, None))
    return TPPOLoop(cfg, None, None, None, task, NullLogger())


def test_stops_after_too_many_nonfinite_steps_in_a_row():
    loop = _loop(limit=3)
    pattern = [1, 1, 0, 1, 1]  # streaks of 2: below the limit
    for bad in pattern:
        m = {"policy/nonfinite_loss": float(bad), "critic/nonfinite_loss": 0.0}
        loop._check_nonfinite(m)
    assert m["health/nonfinite_updates"] == 4.0
    # the third bad step in a row (policy fine, critic not: still a bad step) stops the run
    with pytest.raises(NonFiniteLossError, match="algorithm.max_nonfinite_updates=3") as err:
        loop._check_nonfinite({"policy/nonfinite_loss": 0.0, "critic/nonfinite_loss": 1.0})
    assert isinstance(err.value, RunAborted)  # the entry point turns it into exit 1 + resume hint


def test_failure_totals_survive_a_checkpoint():
    a = _loop(limit=5)
    a.failures["reward_timeout"] = 3
    a._check_nonfinite({"policy/nonfinite_loss": 1.0})
    b = _loop(limit=5)
    b.load_state_dict(a.state_dict())
    assert b.failures["reward_timeout"] == 3 and b.nonfinite_total == 1

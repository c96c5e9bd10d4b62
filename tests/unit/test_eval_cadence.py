"""train.EvalCadence: held-out evaluations by steps (data.eval_every) or on the training clock
(data.eval_every_s), against a plain reference loop."""
import math
import random

import pytest

from megatron_tppo.config import ConfigError
from megatron_tppo.config_io import load_config
from megatron_tppo.train import EvalCadence


def evaluated(cadence: EvalCadence, step_s: list[float]) -> list[int]:
    n = len(step_s)
    return [i + 1 for i, s in enumerate(step_s) if cadence.due(i + 1, s, last=i + 1 == n)]


def test_by_steps_and_disabled():
    assert evaluated(EvalCadence(3), [5.0] * 7) == [3, 6, 7]
    assert evaluated(EvalCadence(0, 10.0), [5.0] * 7) == []


@pytest.mark.parametrize("seed", range(5))
def test_by_training_seconds_against_a_plain_loop(seed):
    rng = random.Random(seed)
    step_s = [rng.uniform(1.0, 40.0) for _ in range(60)]
    every = 45.0
    expect, clock = [], 0.0
    for i, s in enumerate(step_s):  # evaluate when a multiple of `every` lies in (clock, clock + s]
        if math.floor((clock + s) / every) > math.floor(clock / every) or i + 1 == len(step_s):
            expect.append(i + 1)
        clock += s
    assert evaluated(EvalCadence(1, every), step_s) == expect
    # the step cadence is ignored on the training clock
    assert evaluated(EvalCadence(7, every), step_s) == expect


def test_one_long_step_past_several_marks_evaluates_once():
    # clock 4, 39 (past 10, 20, 30: one evaluation), 39.5, 40 (on the mark), 60 (the last step)
    assert evaluated(EvalCadence(1, 10.0), [4.0, 35.0, 0.5, 0.5, 20.0]) == [2, 4, 5]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.eval_every_s"):
        load_config("examples/tiny_cpu.yaml", ["data.eval_every_s=-1"])
    with pytest.raises(ConfigError, match="data.eval_every_s"):
        load_config("examples/tiny_cpu.yaml", ["data.eval_every=0", "data.eval_every_s=30"])

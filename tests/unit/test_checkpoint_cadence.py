"""When the step loop checkpoints: every N steps, after a wall-clock interval, and at the end."""
from __future__ import annotations

from megatron_tppo.train import CheckpointCadence


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(cadence: CheckpointCadence, clock: Clock, step_s: list[float], save_s: float = 0.0,
        last: int | None = None) -> list[int]:
    """Steps (1-based) after which a checkpoint is written, for steps taking ``step_s`` seconds."""
    saved = []
    for i, dt in enumerate(step_s, 1):
        clock.now += dt
        if cadence.due(i, final=i == last):
            clock.now += save_s
            cadence.saved()
            saved.append(i)
    return saved


def test_off_saves_only_at_the_end():
    clock = Clock()
    assert run(CheckpointCadence(0, 0.0, clock), clock, [1000.0] * 5, last=5) == [5]


def test_every_n_steps():
    clock = Clock()
    assert run(CheckpointCadence(2, 0.0, clock), clock, [1.0] * 7, last=7) == [2, 4, 6, 7]


def test_wall_clock_interval_counts_from_the_last_save():
    clock = Clock()
    # 3 h steps against a 4 h interval: the first step that ends 4 h after the last save
    hours = [3 * 3600.0] * 6
    assert run(CheckpointCadence(0, 4 * 3600.0, clock), clock, hours) == [2, 4, 6]
    # the interval restarts when a save ends, so a long save does not cause back-to-back saves
    clock = Clock()
    assert run(CheckpointCadence(0, 10.0, clock), clock, [6.0] * 6, save_s=9.0) == [2, 4, 6]


def test_short_interval_saves_every_step_and_counts_from_the_start():
    clock = Clock()
    assert run(CheckpointCadence(0, 0.001, clock), clock, [0.5] * 3) == [1, 2, 3]
    clock = Clock()
    cadence = CheckpointCadence(0, 60.0, clock)
    clock.now += 59.0
    assert not cadence.due(1)
    clock.now += 1.0
    assert cadence.due(1)


def test_both_cadences_whichever_comes_first():
    clock = Clock()
    steps = [1.0, 1.0, 100.0, 1.0, 1.0, 1.0]
    assert run(CheckpointCadence(4, 50.0, clock), clock, steps, last=6) == [3, 4, 6]


def test_signal_or_last_step_always_saves():
    clock = Clock()
    cadence = CheckpointCadence(10, 1e9, clock)
    assert not cadence.due(3)
    assert cadence.due(3, final=True)

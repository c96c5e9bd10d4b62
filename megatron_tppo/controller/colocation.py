"""Applies the memory schedule: every phase change asks the schedule what to release and load.

:mod:`megatron_tppo.planning.schedule` is the plan (the phases, what each component holds in
each, and the moves between them); this class makes the moves on the real components and
nothing else: ``enter(phase)`` takes the calls :func:`~megatron_tppo.planning.schedule.transition`
returns for the current and the new phase and makes them in that order (releases first). Engines
on their own GPUs (``rollout.colocate=false``) have the same states in every phase: nothing moves.

Shared trainers (``parallel.trainers=shared``) take turns in a phase both work in:
``enter(name, role)`` (or :meth:`Colocation.turn`) enters ``<name>@<role>``, critic first; with
split trainers the role changes nothing (both work in the one phase, the second turn is a no-op).

After every move it asks each component what it really holds (trainer ranks: which kinds are off
the device; engines: which tags sleep and whether a level-2 sleep dropped the weights) and
appends one line to ``<output_dir>/memory_trace.jsonl``: the phases, the calls, the time they
took and what the components reported. The rehearsal test reads it back against the schedule.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from megatron_tppo.planning import schedule as S


class Colocation:
    def __init__(self, cfg, rollout, trace_path: Optional[Path] = None):
        self.cfg, self.rollout = cfg, rollout
        self.policy = self.critic = None
        self.enabled = cfg.rollout.colocate
        self.phase: Optional[str] = None
        """The current phase (None before the engines start)."""
        self.trace: list[str] = []
        """The phases entered, in order."""
        self.trace_path = Path(trace_path) if trace_path is not None else None
        self.seconds = 0.0
        """Time spent handing memory over since the last :meth:`take_seconds`."""
        self.shared = S.shared(cfg)
        """Do the trainers take turns on the same GPUs (``parallel.trainers=shared``)?"""

    def attach(self, policy=None, critic=None) -> None:
        """A trainer group once built, either first (the moves before that touch only the engines
        and the trainers already attached)."""
        if policy is not None:
            self.policy = policy
        if critic is not None:
            self.critic = critic

    def enter(self, name: str, role: Optional[str] = None) -> None:
        """Move every component into phase ``name``'s state, or with shared trainers into
        ``role``'s turn of it (:func:`~megatron_tppo.planning.schedule.turn_name`); a no-op when
        already there."""
        name = S.turn_name(self.cfg, name, role)
        if name == self.phase:
            return
        new = S.phase(self.cfg, name)
        actions = [] if self.phase is None else S.transition(S.phase(self.cfg, self.phase), new)
        t0 = time.perf_counter()
        for a in actions:
            self._apply(a)
        dt = time.perf_counter() - t0
        self.seconds += dt
        before, self.phase = self.phase, name
        self.trace.append(name)
        if self.trace_path is not None:
            line = {"time": time.time(), "from": before, "to": name, "actions": [a.to_json() for a in actions],
                    "seconds": dt, "observed": self.observe()}
            with open(self.trace_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def _apply(self, a: S.Action) -> None:
        target = {"policy": self.policy, "critic": self.critic, "rollout": self.rollout}[a.component]
        if target is None:
            raise RuntimeError(f"memory schedule: {a.component}.{a.method} before the {a.component} exists "
                               f"(phase {self.phase})")
        if a.method == "offload":
            kinds = set(a.args)
            # gradients are dropped, never copied: every update zeroes them before its backward
            target.offload(params="params" in kinds, grads="drop" if "grads" in kinds else False,
                           optimizer="optimizer" in kinds)
        elif a.method == "onload":
            target.onload()
        elif a.method == "sleep":
            target.sleep(*a.args)
        elif a.method == "wake_up":
            target.wake_up(list(a.args))
        else:
            raise ValueError(f"memory schedule: unknown call {a.method}")

    def observe(self) -> dict:
        """What every component reports it holds now (for the trace)."""
        out = {"rollout": self.rollout.memory_state()}
        for name in ("policy", "critic"):
            group = getattr(self, name)
            out[name] = group.memory_state() if group is not None else None
        return out

    # the step loop's phases, by what happens in them
    def for_training(self, warmup: bool = False) -> None:
        """Values and updates: engines asleep (level 1 in a warm-up step: no sync refills them)."""
        self.enter("warmup_values" if warmup else "values")

    def for_updates(self, warmup: bool = False, role: str = "critic") -> None:
        """The updates, ``role``'s turn (a warm-up step updates only the critic: no turns)."""
        self.enter("warmup_updates" if warmup else "updates", role)

    def turn(self, role: str) -> None:
        """``role``'s turn in the current phase (shared trainers; with split ones a no-op)."""
        self.enter(S.base_name(self.phase), role)

    def for_sync(self) -> None:
        start = S.base_name(self.phase) in ("trainer_build", "checkpoint_load", "resume")
        self.enter("first_sync" if start else "sync")

    def for_generation(self) -> None:
        self.enter("generation")

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

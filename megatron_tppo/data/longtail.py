"""A long-tailed variant of the arithmetic task: response lengths shaped like long chain-of-thought.

Same chain as :mod:`megatron_tppo.data.arith` (start value, one-digit +/- steps mod 100, a worked
solution that restates every step, final ``#<answer>``) with two changes:

    prompt:   ``47 aa+8 ab-3 ac+5 ?``
    solution: ``aa+8:47=55 ab-3:55=52 ac+5:52=57 #57`` then EOS

* Steps are keyed by two letters (``aa``, ``ab``, ... ``zz``), so a chain can have up to 676 steps;
  each step is 11 tokens of the character tokenizer (with its space) and the correct response is
  ``11 * steps + 4`` tokens with EOS.
* The number of steps is lognormal, rounded and clipped to ``[1, max_steps]``: ``median_steps``
  sets the bulk, ``sigma`` the tail. With the defaults (median 8, sigma 1.0, cap 92 -> 1016 tokens)
  the response length has median ~100 tokens, p99 ~1000 and ~1% of chains at the cap, the shape
  of long-CoT RL (most responses short, a heavy tail to the cap).

Splits and reward are those of the arith task: a problem is held out iff the sha256 of its prompt
falls below ``heldout_fraction`` (train and held-out never share a problem), problem ``i`` of a
split is a pure function of ``(seed, split, i)``, and the reward is the arith reward (the last
``#<int>`` must equal the answer). Pure: no torch, no I/O.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from megatron_tppo.data.arith import LETTERS, MODULUS, ArithProblem, ArithTask, heldout_score

MAX_KEYS = len(LETTERS) ** 2


def key(i: int) -> str:
    """Two-letter key of step ``i`` (0 -> ``aa``, 27 -> ``bb``)."""
    return LETTERS[i // len(LETTERS)] + LETTERS[i % len(LETTERS)]


def response_length(steps: int) -> int:
    """Tokens of the correct response with EOS (character tokenizer)."""
    return 11 * steps + 4


def steps_for_length(tokens: int) -> int:
    """Most steps whose correct response fits in ``tokens``."""
    return (tokens - 4) // 11


@dataclass(frozen=True)
class LongProblem(ArithProblem):
    """An arith chain whose steps have two-letter keys (``aa``, ``ab``, ...), so it can be long."""

    @staticmethod
    def key(i: int) -> str:
        return key(i)


@dataclass(frozen=True)
class LongTailTask:
    """Generator of long-tailed chains; its fields fix the distribution (the seed picks problems)."""

    max_steps: int = 92
    """Cap on the chain length (92 -> longest correct response 1016 tokens with EOS)."""
    median_steps: float = 8.0
    """Median of the lognormal step count (~100-token responses)."""
    sigma: float = 1.0
    """Log-space standard deviation of the step count: the weight of the tail."""
    heldout_fraction: float = 0.1
    """Share of the problem space (by prompt hash) reserved for the held-out split."""

    def __post_init__(self):
        if not 1 <= self.max_steps <= MAX_KEYS:
            raise ValueError(f"max_steps must be in [1, {MAX_KEYS}], got {self.max_steps}")
        if not (self.median_steps >= 1 and self.sigma >= 0):
            raise ValueError(f"need median_steps >= 1 and sigma >= 0, got {self.median_steps}, {self.sigma}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def split_of(self, problem: LongProblem) -> str:
        return "heldout" if heldout_score(problem.prompt) < self.heldout_fraction else "train"

    def draw_steps(self, rng: random.Random) -> int:
        s = round(math.exp(rng.gauss(math.log(self.median_steps), self.sigma)))
        return min(self.max_steps, max(1, s))

    def _draw(self, rng: random.Random) -> LongProblem:
        steps = self.draw_steps(rng)
        terms = tuple((rng.choice("+-"), rng.randint(1, 9)) for _ in range(steps))
        return LongProblem(rng.randrange(MODULUS), terms)

    def problem(self, split: str, index: int, seed: int = 0) -> LongProblem:
        """Problem ``index`` of ``split`` ("train" or "heldout"): a pure function of its arguments."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"longtail:{seed}:{split}:{index}")
        while True:  # rejection sampling on the prompt hash
            p = self._draw(rng)
            if self.split_of(p) == split:
                return p

    # the same streams over self.problem as the short task's
    iter_problems = ArithTask.iter_problems
    heldout_set = ArithTask.heldout_set


def percentiles(values, qs=(50, 90, 95, 99)) -> dict:
    """Nearest-rank percentiles of ``values`` (plus mean and max)."""
    xs = sorted(values)
    out = {f"p{q}": xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))] for q in qs}
    out.update(mean=sum(xs) / len(xs), max=xs[-1], n=len(xs))
    return out

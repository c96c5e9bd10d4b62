"""The synthetic reasoning task of the tiny default: chained arithmetic mod 100.

A problem is a start value and a chain of one-digit additions/subtractions, each keyed by a letter:

    prompt:   ``47 a+8 b-3 c+5 ?``
    solution: ``a+8:47=55 b-3:55=52 c+5:52=57 #57`` then EOS

Why this shape
    * The answer needs the whole chain: every step depends on the previous result, so a model that
      skips steps guesses (1 in 100). Each step is local and small (two-digit +- one digit, with a
      carry), so a few-million-parameter model learns it in minutes on a CPU.
    * Each step first restates its term right after the term's letter (``b-3``): after writing
      ``b`` the model copies what follows ``b`` in the prompt, a plain induction-head pattern
      that small transformers learn early; the rest of the step reads fixed offsets back.
    * Values are zero-padded to two digits, so every step is exactly 10 characters (tokens of the
      character-level tokenizer): the correct response length is ``10 * steps + 4`` tokens with
      EOS, i.e. 14 tokens for one step to 174 for the cap of 17 (fits ``max_response_tokens=192``).
    * The number of steps is ``1 + Geometric``, capped: median 3, a long tail up to the cap. Long
      chains are rare in SFT data, so a small SFT model gets short chains right and long ones
      often wrong, which leaves RL room to improve.

Splits
    A problem belongs to the held-out split iff a hash of its prompt text falls below
    ``heldout_fraction``, so train and held-out never share a problem whatever the seed. Problem
    ``i`` of a split is a pure function of ``(seed, split, i)``: any index can be produced alone,
    which makes the train split a lazy sequence (see :class:`ArithSplit`).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Iterator

MODULUS = 100
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ANSWER_MARK = "#"
_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


@dataclass(frozen=True)
class ArithProblem:
    """One chain: ``start``, then ``(op, digit)`` terms applied left to right mod 100."""

    start: int
    """Start value in [0, 100)."""
    terms: tuple[tuple[str, int], ...]
    """Operations ``("+" | "-", 1..9)``, one per step."""

    @property
    def steps(self) -> int:
        return len(self.terms)

    @staticmethod
    def key(i: int) -> str:
        """The name of step ``i`` in the prompt and the solution."""
        return LETTERS[i]

    @property
    def prompt(self) -> str:
        """The question text (no template, no special tokens)."""
        return f"{self.start:02d} " + " ".join(f"{self.key(i)}{op}{d}" for i, (op, d) in enumerate(self.terms)) + " ?"

    def values(self) -> list[int]:
        """Running values after each step (the last one is the answer)."""
        out, v = [], self.start
        for op, d in self.terms:
            v = (v + d) % MODULUS if op == "+" else (v - d) % MODULUS
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def solution(self) -> str:
        """The worked step-by-step response (without EOS), ending in ``#<answer>``."""
        parts, prev = [], self.start
        for i, ((op, d), v) in enumerate(zip(self.terms, self.values())):
            parts.append(f"{self.key(i)}{op}{d}:{prev:02d}={v:02d}")
            prev = v
        return " ".join(parts) + f" {ANSWER_MARK}{prev:02d}"


def response_length(steps: int) -> int:
    """Tokens of the correct response with EOS, for the character-level tokenizer."""
    return 10 * steps + 4


def parse_answer(text: str) -> int | None:
    """The last ``#<int>`` in ``text`` (None when there is none)."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def heldout_score(prompt: str) -> float:
    """A stable number in [0, 1) from the prompt text (sha256; independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class ArithTask:
    """Generator of problems; its fields fix the distribution (the seed picks the problems)."""

    max_steps: int = 17
    """Cap on the chain length (17 -> longest correct response 174 tokens with EOS)."""
    continue_prob: float = 0.75
    """Probability that a chain goes on after each step (the geometric tail: median 3 steps)."""
    heldout_fraction: float = 0.1
    """Share of the problem space (by prompt hash) reserved for the held-out split."""

    def __post_init__(self):
        if not 1 <= self.max_steps <= len(LETTERS):
            raise ValueError(f"max_steps must be in [1, {len(LETTERS)}], got {self.max_steps}")
        if not 0 <= self.continue_prob < 1:
            raise ValueError(f"continue_prob must be in [0, 1), got {self.continue_prob}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    def split_of(self, problem: ArithProblem) -> str:
        return "heldout" if heldout_score(problem.prompt) < self.heldout_fraction else "train"

    def _draw(self, rng: random.Random) -> ArithProblem:
        steps = 1
        while steps < self.max_steps and rng.random() < self.continue_prob:
            steps += 1
        terms = tuple((rng.choice("+-"), rng.randint(1, 9)) for _ in range(steps))
        return ArithProblem(rng.randrange(MODULUS), terms)

    def problem(self, split: str, index: int, seed: int = 0) -> ArithProblem:
        """Problem ``index`` of ``split`` ("train" or "heldout"): a pure function of its arguments."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        # A str seed goes through sha512 in random.Random: stable across runs and platforms.
        rng = random.Random(f"arith:{seed}:{split}:{index}")
        while True:  # rejection sampling; ~10 draws per held-out problem
            p = self._draw(rng)
            if self.split_of(p) == split:
                return p

    def iter_problems(self, split: str, seed: int = 0, start: int = 0) -> Iterator[ArithProblem]:
        i = start
        while True:
            yield self.problem(split, i, seed)
            i += 1

    def heldout_set(self, n: int, seed: int = 0) -> list[ArithProblem]:
        """``n`` distinct held-out problems (duplicates of short chains are dropped)."""
        out, seen = [], set()
        for p in self.iter_problems("heldout", seed):
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
                if len(out) == n:
                    return out
        raise AssertionError("unreachable")


class ArithSplit:
    """A lazy, fixed-size sequence of ``(prompt_text, meta)`` records of one split.

    ``meta`` holds the reference ``answer`` (int) and the number of ``steps`` (for per-length metrics).
    """

    def __init__(self, task: ArithTask, split: str, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[str, dict]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        p = self.task.problem(self.split, i, self.seed)
        return p.prompt, {"answer": p.answer, "steps": p.steps}

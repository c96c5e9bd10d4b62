"""Slot-utilization simulation of windowed generation (TPPO.md sections 1, 5 and 7).

Drives the real :class:`~megatron_tppo.algorithms.window_pool.WindowPool` with a simulated
generator: every sample has a hidden target length drawn from a long-tailed lognormal (capped at
``max_response_tokens``) and emits EOS when it reaches it. Time is counted in decode iterations:
a step of synchronous generation lasts as long as its longest request (every slot decodes one
token per iteration in parallel, as a continuously batching engine does).

Modes, all from the same prompt stream and the same per-sample lengths:
  * ``ppo``: window = max length; every step waits for the longest response.
  * ``tppo``: the configured window; finished slots are refilled at window boundaries (paper).
  * ``tppo_continuous``: a finished slot takes a new sample at once; a step ends after
    ``window_tokens`` decode iterations (the token-budget mode of section 7).

Utilization = generated tokens / (num_slots x decode iterations), measured in steady state (the
prompt stream never runs out) over the same simulated time horizon for every mode.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterator

from megatron_tppo.algorithms.window_pool import Prompt, WindowPool


@dataclass
class UtilizationResult:
    mode: str
    window_tokens: int
    steps: int
    decode_iterations: int
    tokens: int
    finished: int
    utilization: float
    mean_finished_length: float


def _target_length(seed: int, sample_uid: int, max_len: int, median: float, sigma: float) -> int:
    rng = random.Random(seed * 1_000_003 + sample_uid)
    return max(1, min(max_len, int(round(rng.lognormvariate(math.log(median), sigma)))))


def _prompts() -> Iterator[Prompt]:
    for uid in itertools.count():
        yield Prompt(uid, [1])


def simulate(num_slots: int, samples_per_prompt: int, window_tokens: int, max_len: int, horizon: int,
             continuous: bool = False, seed: int = 0, median: float | None = None,
             sigma: float = 1.0) -> UtilizationResult:
    """Run the pool for ``horizon`` decode iterations; see the module docstring.

    ``median`` of the lognormal defaults to max_len / 8 (most responses short, a long tail
    reaching the cap), ``sigma`` is its shape.
    """
    median = median or max_len / 8
    pool = WindowPool(num_slots, samples_per_prompt, window_tokens, max_len, _prompts())
    target = {}  # sample uid -> hidden length

    def length(uid: int) -> int:
        if uid not in target:
            target[uid] = _target_length(seed, uid, max_len, median, sigma)
        return target[uid]

    t = steps = tokens = finished = finished_len = 0
    while t < horizon:
        pool.refill()
        if not continuous:
            iters = 0
            for req in pool.requests():
                s = pool.sample(req.sample_uid)
                n = min(req.max_new_tokens, length(s.uid) - len(s.response_ids))
                pool.append(req.slot, [0] * n, [0.0] * n, steps, eos=len(s.response_ids) + n >= length(s.uid))
                iters = max(iters, n)
                tokens += n
        else:
            # event-driven: each slot runs for the whole step budget, taking a new sample at once
            iters = window_tokens
            events = [(0, slot) for slot in range(num_slots)]  # (time the slot is free to continue, slot)
            heapq.heapify(events)
            while events:
                now, slot = heapq.heappop(events)
                if now >= iters:
                    continue
                pool.refill()
                reqs = pool.requests([slot])
                if not reqs:
                    continue
                s = pool.sample(reqs[0].sample_uid)
                n = min(reqs[0].max_new_tokens, length(s.uid) - len(s.response_ids), iters - now)
                done = len(s.response_ids) + n >= length(s.uid)
                pool.append(slot, [0] * n, [0.0] * n, steps, eos=done)
                tokens += n
                if done:
                    heapq.heappush(events, (now + n, slot))
        batch = pool.end_step()
        finished += len(batch.finished)
        finished_len += sum(len(s.response_ids) for s in batch.finished)
        t += max(iters, 1)
        steps += 1
    mode = "tppo_continuous" if continuous else ("ppo" if window_tokens >= max_len else "tppo")
    return UtilizationResult(mode, window_tokens, steps, t, tokens, finished, tokens / (num_slots * t),
                             finished_len / max(finished, 1))


def compare_utilization(cfg, seed: int = 0, horizon_windows: int = 24) -> list[UtilizationResult]:
    """PPO vs T-PPO vs continuous T-PPO for the rollout settings of a TPPOConfig."""
    r = cfg.rollout
    horizon = max(r.max_response_tokens, r.window_tokens) * max(2, horizon_windows * r.window_tokens
                                                                  // max(r.max_response_tokens, 1))
    args = (r.num_slots, r.samples_per_prompt)
    return [
        simulate(*args, r.max_response_tokens, r.max_response_tokens, horizon, seed=seed),
        simulate(*args, r.window_tokens, r.max_response_tokens, horizon, seed=seed),
        simulate(*args, r.window_tokens, r.max_response_tokens, horizon, continuous=True, seed=seed),
    ]


def format_table(rows: list[UtilizationResult]) -> str:
    head = f"{'mode':<16}{'window':>8}{'steps':>7}{'iters':>9}{'tokens':>10}{'finished':>10}{'util':>7}{'tok/iter':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.mode:<16}{r.window_tokens:>8}{r.steps:>7}{r.decode_iterations:>9}{r.tokens:>10}"
                     f"{r.finished:>10}{r.utilization:>7.2f}{r.tokens / r.decode_iterations:>10.1f}")
    return "\n".join(lines)

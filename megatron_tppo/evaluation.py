"""Held-out evaluation: one implementation for the training loop's periodic evaluation
(:meth:`~megatron_tppo.controller.loop.TPPOLoop.evaluate`), ``python -m megatron_tppo.evaluate``
and the benchmarks (benchmarks/tppo_vs_ppo.py scores each mode's final model with that CLI).

What is reported, for P prompts with k samples each (rewards r[i][j], response lengths n[i][j] in
tokens, the stop token included when there is one):

- ``accuracy``: pass@1 averaged over the k samples, mean_i mean_j r[i][j] (for the 0/1 rewards of
  megatron_tppo.rewards, the fraction of correct samples; prompts weigh equally).
- ``accuracy_se``: its standard error by the bootstrap over prompts: B resamples of the P prompts
  with replacement (each prompt keeps its k samples), the standard deviation (ddof 1) of the B
  resampled accuracies. Seeded (``random.Random(seed)``): the same inputs give the same number.
  The samples of one prompt are correlated, so resampling samples instead would understate it.
- ``buckets``: accuracy of the samples whose response length falls in each bucket
  [lo, hi) (the last one [lo, hi]); default edges 0, L/8, L/4, L/2, L for the length cap L.
- ``response_length_mean``: mean n[i][j] over all samples.

Pure (no torch, vLLM or Ray): :func:`summarize` works on lists; :func:`evaluate_policy` adds the
generation through any engine with the rollout interface's ``generate``.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

BOOTSTRAP_SAMPLES = 1000
"""Bootstrap resamples B behind ``accuracy_se``."""


@dataclass
class LengthBucket:
    lo: int
    """Shortest response length in the bucket (tokens)."""
    hi: int
    """Upper bound: exclusive, except for the last bucket (inclusive)."""
    count: int
    """Samples in the bucket."""
    accuracy: Optional[float]
    """Mean reward of those samples; None when the bucket is empty."""


@dataclass
class EvalReport:
    accuracy: float
    """pass@1 averaged over k samples (mean over prompts of each prompt's mean reward)."""
    accuracy_se: float
    """Bootstrap standard error of ``accuracy`` over prompts (0 with a single prompt)."""
    response_length_mean: float
    """Mean response length in tokens over all samples."""
    num_prompts: int
    samples_per_prompt: int
    buckets: list[LengthBucket]
    """Accuracy by response length."""
    bootstrap: int
    """Bootstrap resamples used for ``accuracy_se``."""
    seed: int
    """Seed of the bootstrap."""
    rewards: list[list[float]] = field(default_factory=list, repr=False)
    """r[i][j]: reward of sample j of prompt i."""
    lengths: list[list[int]] = field(default_factory=list, repr=False)
    """n[i][j]: its response length in tokens."""

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """The scalars the training loop logs: accuracy, accuracy_se, response_length_mean."""
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_se": self.accuracy_se,
                f"{prefix}response_length_mean": self.response_length_mean}

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table: the headline figures, then accuracy by response length."""
        lines = [f"pass@1 (mean of {self.samples_per_prompt} samples) over {self.num_prompts} prompts: "
                 f"{self.accuracy:.4f} +- {self.accuracy_se:.4f} (bootstrap SE, {self.bootstrap} resamples)",
                 f"mean response length: {self.response_length_mean:.1f} tokens",
                 f"{'length':>15}{'samples':>9}{'accuracy':>10}"]
        for i, b in enumerate(self.buckets):
            span = f"[{b.lo}, {b.hi}{']' if i == len(self.buckets) - 1 else ')'}"
            acc = f"{b.accuracy:.4f}" if b.accuracy is not None else "-"
            lines.append(f"{span:>15}{b.count:>9}{acc:>10}")
        return "\n".join(lines)


def length_edges(max_tokens: int) -> list[int]:
    """Bucket edges 0, L/8, L/4, L/2, L (rounded up, duplicates dropped) for the length cap L:
    finer where most responses of a long-tailed task are, the tail in one bucket."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    edges = [0] + [math.ceil(max_tokens / d) for d in (8, 4, 2)] + [max_tokens]
    return sorted(set(edges))


def bootstrap_se(per_prompt: Sequence[float], resamples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Standard deviation (ddof 1) of the means of ``resamples`` resamples of ``per_prompt`` drawn
    with replacement; 0 for fewer than two values."""
    n = len(per_prompt)
    if n < 2 or resamples < 2:
        return 0.0
    rng = random.Random(seed)
    values = list(per_prompt)
    means = [math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples)]
    return statistics.stdev(means)


def summarize(rewards: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]], max_tokens: int, *,
              edges: Optional[Sequence[int]] = None, resamples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0) -> EvalReport:
    """The report for rewards[i][j] and lengths[i][j] (prompt i, sample j; k samples per prompt).

    ``edges``: ascending bucket edges covering every length (default :func:`length_edges`).
    """
    if len(rewards) != len(lengths) or any(len(r) != len(n) for r, n in zip(rewards, lengths)):
        raise ValueError("rewards and lengths must have the same [prompt][sample] shape")
    ks = {len(r) for r in rewards}
    if len(ks) > 1 or 0 in ks:
        raise ValueError(f"every prompt needs the same number (>= 1) of samples, got {sorted(ks)}")
    k = ks.pop() if ks else 0
    edges = list(edges) if edges is not None else length_edges(max_tokens)
    if len(edges) < 2 or edges != sorted(edges):
        raise ValueError(f"edges must be ascending with at least two values, got {edges}")
    per_prompt = [math.fsum(r) / k for r in rewards]
    flat = [(float(x), int(n)) for r, ns in zip(rewards, lengths) for x, n in zip(r, ns)]
    outside = [n for _, n in flat if not edges[0] <= n <= edges[-1]]
    if outside:
        raise ValueError(f"response lengths {sorted(set(outside))[:5]} fall outside the edges {edges}")
    buckets = []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = b == len(edges) - 2
        xs = [x for x, n in flat if lo <= n < hi or (last and n == hi)]
        buckets.append(LengthBucket(lo, hi, len(xs), math.fsum(xs) / len(xs) if xs else None))
    return EvalReport(
        accuracy=math.fsum(per_prompt) / len(per_prompt) if per_prompt else float("nan"),
        accuracy_se=bootstrap_se(per_prompt, resamples, seed),
        response_length_mean=math.fsum(n for _, n in flat) / len(flat) if flat else float("nan"),
        num_prompts=len(rewards), samples_per_prompt=k, buckets=buckets, bootstrap=resamples, seed=seed,
        rewards=[[float(x) for x in r] for r in rewards], lengths=[[int(n) for n in ns] for ns in lengths])


def score_samples(samples: Sequence[Sequence[int]], metas: Sequence[dict], k: int,
                  decode: Callable[[list[int]], str],
                  score: Callable[[str, dict], float]) -> tuple[list[list[float]], list[list[int]]]:
    """Rewards and lengths [prompt][sample] of prompt-major ``samples`` (``samples[i * k + j]``:
    the token ids of sample j of prompt i): ``score(decode(ids), metas[i])`` and ``len(ids)``."""
    if len(samples) != len(metas) * k:
        raise ValueError(f"{len(samples)} samples for {len(metas)} prompts x {k}")
    rewards = [[float(score(decode(list(samples[i * k + j])), metas[i])) for j in range(k)] for i in range(len(metas))]
    lengths = [[len(samples[i * k + j]) for j in range(k)] for i in range(len(metas))]
    return rewards, lengths


def evaluate_policy(engine, prompts: Sequence, k: int, max_tokens: int, sampling, decode: Callable[[list[int]], str],
                    score: Callable[[str, dict], float], *, edges: Optional[Sequence[int]] = None,
                    resamples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[EvalReport, list]:
    """Generate k samples of every prompt (``prompts``: objects with ``prompt_ids`` and ``meta``,
    e.g. window_pool.Prompt) through ``engine.generate(prompt_ids, max_tokens, sampling, n=k)``
    (a rollout engine or group), score them and summarize. Returns (report, generation results)."""
    results = engine.generate([list(p.prompt_ids) for p in prompts], [max_tokens] * len(prompts), sampling, n=k)
    rewards, lengths = score_samples([g.token_ids for g in results], [p.meta for p in prompts], k, decode, score)
    return summarize(rewards, lengths, max_tokens, edges=edges, resamples=resamples, seed=seed), results

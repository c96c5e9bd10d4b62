"""Wall-clock per 1,000 finished responses for PPO, T-PPO and continuous T-PPO (issue 13 item 5).

A steady-state model on top of the plan's own per-step costs (:func:`megatron_tppo.plan.make_plan`):
from one plan per mode it takes the decode-iteration time ``t_iter``, the running sequences per
engine ``B`` (KV-cache bound), the number of engines ``E``, the training seconds for a step of
``num_slots x window`` tokens and the weight-sync seconds. For a response-length distribution
``p(l)`` on ``1..L`` (capped at ``L = max_response_tokens``), with ``S`` slots and window ``W``:

    mode             tokens per step T      finished per step F     longest piece per step
    ppo (W >= L)     S E[l]                 S                       E[max of S lengths]
    tppo (window)    S E[l] / E[ceil(l/W)]  S / E[ceil(l/W)]        W
    tppo_continuous  S W                    S W / E[l]              W

* Generation of a step takes ``max(T / (E B), longest) * t_iter``: the engines cannot run more
  than ``B`` sequences at once, and the step cannot end before its longest piece is decoded.
* Training takes the plan's training seconds scaled by ``T / (S W_plan)`` (cost linear in tokens),
  weight sync the plan's seconds once per step.
* Wall-clock per 1,000 finished responses = ``1000 x step seconds / F``.

Where this model and the paper (up to 2.5x less wall-clock at equal accuracy) differ
    * The paper's gain is at equal ACCURACY; this is wall-clock per finished response: it does not
      model sample efficiency (policy lag, truncated-segment updates, the critic's quality).
    * When the KV cache bounds the batch (``T / (E B)`` above the longest piece, as the 32B plan
      finds at few nodes), generation is token-bound: every mode pays the same per token and PPO's
      wait for the longest response costs little. The tail only dominates when there are enough
      engines that ``T / (E B)`` drops below ``L``; the speedup therefore grows with nodes.
    * ``t_iter`` is the plan's full-batch iteration time: a half-empty PPO tail iteration is
      counted as expensive as a full one (memory-bound decoding makes this close to true).
    * T-PPO's window steps are upper-bounded at ``W`` iterations (the plan's convention); PPO
      pays the expected maximum of ``S`` lengths, which for a tail reaching the cap is ~``L``.
    * Training is linear in tokens; attention's growth with context and the critic seeing only
      finished responses (the plan's split) are kept only through each mode's own plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Dist = Sequence[tuple[int, float]]
"""A discrete length distribution: ``(length, probability)`` pairs, probabilities summing to 1."""

MODES = ("ppo", "tppo", "tppo_continuous")


def lognormal_lengths(median: float, sigma: float, cap: int, bins: int = 512) -> list[tuple[int, float]]:
    """A lognormal length distribution clipped at ``cap`` (the mass above the cap sits at it),
    discretized into ``bins`` equal-width bins represented by their upper edge."""
    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf((math.log(x) - math.log(median)) / (sigma * math.sqrt(2)))) if x > 0 else 0.0

    edges = [round(cap * (i + 1) / bins) for i in range(bins)]
    out, prev = [], 0.0
    for i, e in enumerate(edges):
        c = 1.0 if i == bins - 1 else cdf(e)
        if c > prev:
            out.append((max(1, e), c - prev))
        prev = c
    return out


def mean(dist: Dist, f=lambda l: l) -> float:
    return sum(p * f(l) for l, p in dist)


def expected_max(dist: Dist, n: int) -> float:
    """E[max of n independent draws] = sum over the support of l_k x (F(l_k)^n - F(l_{k-1})^n)."""
    out, c = 0.0, 0.0
    for l, p in sorted(dist):
        out += l * ((c + p) ** n - c ** n)
        c += p
    return out


@dataclass(frozen=True)
class StepCosts:
    """Per-step costs of one mode from the plan (seconds, and the batch limits)."""

    t_iter: float
    """Seconds per decode iteration (all engines in parallel)."""
    running_per_engine: float
    """Sequences one engine decodes at once (B)."""
    engines: int
    """Rollout engines (E)."""
    train_s: float
    """Training seconds for a step of ``num_slots x window`` tokens."""
    sync_s: float
    """Weight-sync seconds per step."""
    window: int
    """The window the plan's training estimate assumed."""


@dataclass(frozen=True)
class ModeProjection:
    mode: str
    tokens_per_step: float
    finished_per_step: float
    gen_s: float
    train_s: float
    sync_s: float

    @property
    def step_s(self) -> float:
        return self.gen_s + self.train_s + self.sync_s

    @property
    def s_per_1000(self) -> float:
        return 1000 * self.step_s / self.finished_per_step


def project(mode: str, dist: Dist, slots: int, window: int, costs: StepCosts) -> ModeProjection:
    """One mode's steady-state step (see the module docstring's table)."""
    el = mean(dist)
    if mode == "ppo":
        tokens, finished, longest = slots * el, float(slots), expected_max(dist, slots)
    elif mode == "tppo":
        windows = mean(dist, lambda l: math.ceil(l / window))
        tokens, finished, longest = slots * el / windows, slots / windows, float(window)
    elif mode == "tppo_continuous":
        tokens, finished, longest = float(slots * window), slots * window / el, float(window)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    iters = max(tokens / (costs.engines * costs.running_per_engine), longest)
    train = costs.train_s * tokens / (slots * costs.window)
    return ModeProjection(mode, tokens, finished, iters * costs.t_iter, train, costs.sync_s)


# ------------------------------------------------------------------------- from the plan (CLI)

PAPER_SPEEDUP = 2.5
"""T-PPO paper: up to 2.5x less wall-clock than PPO at equal accuracy (Qwen2.5-32B, AIME)."""


def costs_from_plan(cfg, nodes: int, gpus_per_node: int = 8, window: int | None = None) -> StepCosts:
    """Fill the layout to the cluster (as ``plan --fill``) and read the per-step costs of ``window``."""
    import copy

    from megatron_tppo.plan import fill_layout, make_plan

    c = copy.deepcopy(cfg)
    if window is not None:
        c.rollout.window_tokens = window
    fill_layout(c, nodes * gpus_per_node)
    c.validate()
    n = make_plan(c, nodes, gpus_per_node).numbers
    engines = c.rollout.num_engines
    slots_per_engine = c.rollout.num_slots / engines
    # make_plan: gen_s = slots_per_engine * W / B * t_iter, and its printed B; recover t_iter from
    # the same numbers: B = the batch it used (KV bound), t_iter = gen_s * B / (slots_per_engine * W)
    batch = n.get("running_per_engine") or _batch_of(c, n)
    t_iter = n["gen_s"] * batch / (slots_per_engine * c.rollout.window_tokens)
    return StepCosts(t_iter, batch, engines, n["train_s"], n["sync_s"], c.rollout.window_tokens)


def _batch_of(cfg, numbers: dict) -> float:
    """Running sequences per engine as make_plan computes it: min(slots per engine, KV tokens / context)."""
    r = cfg.rollout
    full = 1024 + r.max_response_tokens
    ctx = min(1024 + r.window_tokens * (cfg.max_windows + 1) / 2, full)
    return max(min(r.num_slots / r.num_engines, numbers["kv_tokens_per_engine"] / ctx), 1.0)


def compare_modes(cfg, nodes_list=(4, 8, 16), median: float | None = None, sigma: float = 1.0,
                  gpus_per_node: int = 8, resident: bool = False) -> list[tuple[int, list[ModeProjection]]]:
    """Per node count, the three modes. ``resident``: every slot decodes at once (as if the KV
    cache did not bound the batch): the regime in which PPO's wait for the longest response shows."""
    import dataclasses

    r = cfg.rollout
    dist = lognormal_lengths(median or r.max_response_tokens / 8, sigma, r.max_response_tokens)
    out = []
    for nodes in nodes_list:
        tppo = costs_from_plan(cfg, nodes, gpus_per_node)
        ppo = costs_from_plan(cfg, nodes, gpus_per_node, window=r.max_response_tokens)
        if resident:
            tppo, ppo = (dataclasses.replace(c, running_per_engine=r.num_slots / c.engines) for c in (tppo, ppo))
        out.append((nodes, [project("ppo", dist, r.num_slots, r.max_response_tokens, ppo),
                            project("tppo", dist, r.num_slots, r.window_tokens, tppo),
                            project("tppo_continuous", dist, r.num_slots, r.window_tokens, tppo)]))
    return out


def format_comparison(cfg, rows, median: float | None = None, sigma: float = 1.0, title: str = "") -> str:
    r = cfg.rollout
    dist = lognormal_lengths(median or r.max_response_tokens / 8, sigma, r.max_response_tokens)
    lines = [f"wall-clock per 1,000 finished responses (steady state; lengths lognormal median "
             f"{median or r.max_response_tokens / 8:.0f}, sigma {sigma:g}, capped at {r.max_response_tokens}: "
             f"mean {mean(dist):.0f}; window {r.window_tokens}; {r.num_slots} slots){title}",
             f"{'nodes':>5} {'mode':<16}{'gen s':>9}{'train s':>9}{'sync s':>8}{'step s':>9}{'finished':>9}"
             f"{'s/1000':>9}{'vs PPO':>8}"]
    for nodes, projs in rows:
        base = projs[0].s_per_1000
        for p in projs:
            lines.append(f"{nodes:>5} {p.mode:<16}{p.gen_s:>9.0f}{p.train_s:>9.0f}{p.sync_s:>8.1f}{p.step_s:>9.0f}"
                         f"{p.finished_per_step:>9.0f}{p.s_per_1000:>9.0f}{base / p.s_per_1000:>7.2f}x")
    return "\n".join(lines)


def report(cfg, nodes_list=(4, 8, 16)) -> str:
    """The ``plan --compare-modes`` output: the plan's KV-bound batch, then every slot resident."""
    lines = [format_comparison(cfg, compare_modes(cfg, nodes_list)),
             format_comparison(cfg, compare_modes(cfg, nodes_list, resident=True),
                               title="\nif every slot were resident (the KV cache not bounding the batch):")]
    lines.append(f"paper: up to {PAPER_SPEEDUP}x less wall-clock than PPO at equal accuracy. This model counts "
                 "wall-clock per finished response only (no sample efficiency); PPO loses most where the KV "
                 "cache does not bound the batch (more nodes), see megatron_tppo/projection.py.")
    return "\n".join(lines)

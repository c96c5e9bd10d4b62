"""Wall-clock per 1,000 finished responses for PPO, T-PPO and continuous T-PPO.

A steady-state model on the plan's own unit costs (:func:`megatron_tppo.plan.make_plan`): its
decode roofline (weights and KV read per iteration, HBM bandwidth), the engines' KV capacity, the
number of engines ``E``, the seconds per FLOP of the policy, the critic and prefill, and the
weight-sync seconds. The running sequences per engine ``B`` are its slots, or fewer when their KV
at the distribution's mean decoding context does not fit (:func:`decode_context`: the same in
every mode); the decode iteration ``t_iter`` follows from ``B``. For a response-length distribution ``p(l)`` on ``1..L``
(capped at ``L = max_response_tokens``), with ``S`` slots, window ``W`` and prompt ``P``:

    mode             tokens per step T      finished per step F     longest piece per step
    ppo (W >= L)     S E[l]                 S                       E[max of S lengths]
    tppo (window)    S E[l] / E[ceil(l/W)]  S / E[ceil(l/W)]        W
    tppo_continuous  S W                    S W / E[l]              W

* Pieces: a response reaches the trainers in pieces, one per step it lives through, ending at
  ``e_1 < e_2 < ... = l`` tokens. PPO: one piece. Window refill: ends at ``W, 2W, ...``.
  Continuous refill: a response starts anywhere inside a step, so its ends are ``W-u, 2W-u, ...``
  with the offset ``u`` uniform on ``0..W-1`` (a slot decodes about ``W`` tokens per step).
* Every piece is trained and valued with its whole context ``c = P + e_j`` (TPPO.md section 3:
  earlier windows are context, forward and backward, without loss), and a piece after the first
  is prefilled again from ``P + e_(j-1)`` (the sync resets vLLM's prefix cache). A row of context
  ``c`` costs ``c (k N + a c)`` FLOPs, ``k`` = 6 (training) or 2 (forward), ``a`` the causal
  attention term (the plan's formula). Per finished response: the policy trains on its pieces; the
  critic computes values on its pieces and trains once on the finished response. With
  ``parallel.trainers=split`` they run on disjoint GPUs at once, so training takes the slower of
  the two; with ``shared`` each runs on all the GPUs in turn, so training takes both.
* Generation of a step: ``max(T / (E B), longest) * t_iter`` of decoding plus the step's
  prefill spread over the engines.
* The sync and the trainers' turn swaps are the plan's, per step.
* Wall-clock per 1,000 finished responses = ``1000 x step seconds / F``.

Checked against the CPU benchmark (benchmarks/tppo_vs_ppo.py, the long-tailed task, W = L/4):
on the SFT model's lengths (benchmarks/results/longtail_lengths.json, prompts of 73 tokens) these
pieces give 1.54x (window) and 1.81x (continuous) PPO's context tokens per generated token; the
runs (seeds 1234 and 1235, 480 s each) spent 1.54x/1.45x (window) and 1.45x/1.48x (continuous)
PPO's training seconds, and 1.49x-1.57x its value-forward seconds, per generated token. tests/unit/test_projection.py checks the pieces against the real
window pool.

Where this model and the paper (up to 2.5x less wall-clock at equal accuracy) differ
    * The paper's gain is at equal ACCURACY; this is wall-clock per finished response: it does not
      model sample efficiency (policy lag, truncated-segment updates, the critic's quality).
    * When the KV cache bounds the batch (``T / (E B)`` above the longest piece, as the 32B plan
      finds at few nodes), generation is token-bound: every mode pays the same per token and PPO's
      wait for the longest response costs little. The tail only dominates when there are enough
      engines that ``T / (E B)`` drops below ``L``; the speedup therefore grows with nodes.
    * Windows cost training: a response of many windows is trained on its prefix once per window.
      For a long tail most tokens sit in long responses, so T-PPO trains on more context per
      generated token than PPO; continuous refill, which cuts every response at a random point,
      more still. Where training is a large share of the step this eats the generation gain.
    * ``t_iter`` is a full batch's iteration time (weights plus ``B`` sequences' KV): a half-empty
      PPO tail iteration is counted as expensive as a full one. Where the weights dominate the
      bytes read this is close to true; where the KV does it favours T-PPO.
    * T-PPO's window steps are upper-bounded at ``W`` iterations (the plan's convention); PPO
      pays the expected maximum of ``S`` lengths, which for a tail reaching the cap is ~``L``.
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
    """One mode's unit costs from the plan. A row of context ``c`` costs ``c (lin + att c)`` seconds
    (``*_train``: forward and backward; the critic's value forward is a third of its training)."""

    t_iter: float
    """Seconds per decode iteration (all engines in parallel)."""
    running_per_engine: float
    """Sequences one engine decodes at once (B)."""
    engines: int
    """Rollout engines (E)."""
    sync_s: float
    """Weight-sync seconds per step."""
    prompt_tokens: float = 0.0
    policy_train: tuple[float, float] = (0.0, 0.0)
    """(lin, att) of the policy's training."""
    critic_train: tuple[float, float] = (0.0, 0.0)
    """(lin, att) of the critic's training."""
    prefill: tuple[float, float] = (0.0, 0.0)
    """(lin, att) of one engine prefilling a row."""
    trainers_shared: bool = False
    """Policy and critic take turns on the same GPUs (``parallel.trainers=shared``): their
    training adds up instead of overlapping."""
    swap_s: float = 0.0
    """The trainers' offloads and onloads per step (the plan's turn swaps)."""


def row_s(c: float, cost: tuple[float, float]) -> float:
    """Seconds for one row of context ``c`` at ``cost = (lin, att)``."""
    return c * (cost[0] + cost[1] * c)


def piece_ends(length: int, window: int, offset: int = 0) -> list[int]:
    """Where a response of ``length`` tokens is cut into steps: ``window - offset``,
    ``2 window - offset``, ... below ``length``, then ``length`` (``offset`` in ``0..window-1``)."""
    ends, e = [], window - offset
    while e < length:
        ends.append(e)
        e += window
    return ends + [length]


def offsets(mode: str, window: int, n: int = 16) -> list[int]:
    """The start offsets a mode averages over: 0 for PPO and window refill; for continuous refill
    ``n`` evenly spaced values of ``0..window-1`` (all of them when ``window <= n``)."""
    if mode != "tppo_continuous":
        return [0]
    return list(range(window)) if window <= n else [int((k + 0.5) * window / n) for k in range(n)]


def response_costs(mode: str, dist: Dist, window: int, costs: StepCosts) -> tuple[float, float, float]:
    """Expected (policy training, critic, prefill) seconds per finished response (module docstring)."""
    p = costs.prompt_tokens
    value = (costs.critic_train[0] / 3, costs.critic_train[1] / 3)
    us = offsets(mode, window)
    pol = cri = pre = 0.0
    for length, prob in dist:
        a = b = c = 0.0
        for u in us:
            ends = piece_ends(length, window, u)
            a += sum(row_s(p + e, costs.policy_train) for e in ends)
            b += sum(row_s(p + e, value) for e in ends)
            c += sum(row_s(p + e, costs.prefill) for e in [0] + ends[:-1])
        pol += prob * a / len(us)
        cri += prob * (b / len(us) + row_s(p + length, costs.critic_train))
        pre += prob * c / len(us)
    return pol, cri, pre


@dataclass(frozen=True)
class ModeProjection:
    mode: str
    tokens_per_step: float
    finished_per_step: float
    gen_s: float
    train_s: float
    sync_s: float
    swap_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.gen_s + self.train_s + self.sync_s + self.swap_s

    @property
    def s_per_1000(self) -> float:
        return 1000 * self.step_s / self.finished_per_step


def project(mode: str, dist: Dist, slots: int, window: int, costs: StepCosts) -> ModeProjection:
    """One mode's steady-state step (see the module docstring)."""
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
    pol, cri, pre = response_costs(mode, dist, window, costs)
    iters = max(tokens / (costs.engines * costs.running_per_engine), longest)
    gen = iters * costs.t_iter + finished * pre / costs.engines
    train = pol + cri if costs.trainers_shared else max(pol, cri)
    return ModeProjection(mode, tokens, finished, gen, finished * train, costs.sync_s, costs.swap_s)


# ------------------------------------------------------------------------- from the plan (CLI)

PAPER_SPEEDUP = 2.5
"""T-PPO paper: up to 2.5x less wall-clock than PPO at equal accuracy (Qwen2.5-32B, AIME)."""


def decode_context(dist: Dist, prompt_tokens: float) -> float:
    """Mean context of a decoding sequence, token-weighted: the t-th token of a response (t = 1..l)
    is decoded at context ``P + t``, so ``P + E[l (l+1) / 2] / E[l]``. How a response is cut into
    windows does not change it, so every mode holds the same KV per running sequence."""
    return prompt_tokens + mean(dist, lambda l: l * (l + 1) / 2) / mean(dist)


def costs_from_plan(cfg, nodes: int, dist: Dist, gpus_per_node: int = 8, window: int | None = None,
                    resident: bool = False) -> StepCosts:
    """Fill the layout to the cluster (as ``plan --fill``) and read the unit costs of ``window``.

    The decode batch ``B``: the engine's slots, or fewer when their KV (at :func:`decode_context`)
    does not fit its cache; ``resident``: all its slots regardless. A decode iteration reads the
    weights and the running sequences' KV, or is bound by their compute (the plan's roofline)."""
    import copy

    from megatron_tppo.planning.plan import fill_layout, make_plan

    c = copy.deepcopy(cfg)
    if window is not None:
        c.rollout.window_tokens = window
    fill_layout(c, nodes * gpus_per_node)
    c.validate()
    n = make_plan(c, nodes, gpus_per_node, compare=False).numbers
    ctx = decode_context(dist, n["prompt_tokens"])
    slots = n["slots_per_engine"]
    batch = slots if resident else max(min(slots, n["kv_tokens_per_engine"] / ctx), 1.0)
    t_iter = max(n["decode_weights_s"] + batch * ctx * n["decode_kv_s_per_token"], batch * n["decode_compute_s_per_seq"])
    att = n["attn_flops_per_ctx"]
    return StepCosts(t_iter, batch, c.rollout.num_engines, n["sync_s"], n["prompt_tokens"],
                     policy_train=(6 * n["params"] * n["policy_s_per_flop"], 3 * att * n["policy_s_per_flop"]),
                     critic_train=(6 * n["critic_params"] * n["critic_s_per_flop"], 3 * att * n["critic_s_per_flop"]),
                     prefill=(2 * n["params"] * n["prefill_s_per_flop"], att * n["prefill_s_per_flop"]),
                     trainers_shared=bool(n["trainers_shared"]), swap_s=n["swap_s"])


def compare_modes(cfg, nodes_list=(4, 8, 16), median: float | None = None, sigma: float = 1.0,
                  gpus_per_node: int = 8, resident: bool = False) -> list[tuple[int, list[ModeProjection]]]:
    """Per node count, the three modes. ``resident``: every slot decodes at once (as if the KV
    cache did not bound the batch): the regime in which PPO's wait for the longest response shows."""
    r = cfg.rollout
    dist = lognormal_lengths(median or r.max_response_tokens / 8, sigma, r.max_response_tokens)
    out = []
    for nodes in nodes_list:
        tppo = costs_from_plan(cfg, nodes, dist, gpus_per_node, resident=resident)
        ppo = costs_from_plan(cfg, nodes, dist, gpus_per_node, window=r.max_response_tokens, resident=resident)
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
             f"{'nodes':>5} {'mode':<16}{'gen s':>9}{'train s':>9}{'sync s':>8}{'swap s':>8}{'step s':>9}{'finished':>9}"
             f"{'s/1000':>9}{'vs PPO':>8}"]
    for nodes, projs in rows:
        base = projs[0].s_per_1000
        for p in projs:
            lines.append(f"{nodes:>5} {p.mode:<16}{p.gen_s:>9.0f}{p.train_s:>9.0f}{p.sync_s:>8.1f}{p.swap_s:>8.1f}"
                         f"{p.step_s:>9.0f}"
                         f"{p.finished_per_step:>9.0f}{p.s_per_1000:>9.0f}{base / p.s_per_1000:>7.2f}x")
    return "\n".join(lines)


def report(cfg, nodes_list=(4, 8, 16)) -> str:
    """The ``plan --compare-modes`` output: the plan's KV-bound batch, then every slot resident."""
    lines = [format_comparison(cfg, compare_modes(cfg, nodes_list)),
             format_comparison(cfg, compare_modes(cfg, nodes_list, resident=True),
                               title="\nif every slot were resident (the KV cache not bounding the batch):")]
    lines.append(f"paper: up to {PAPER_SPEEDUP}x less wall-clock than PPO at equal accuracy. This model counts "
                 "wall-clock per finished response only (no sample efficiency); PPO loses most where the KV "
                 "cache does not bound the batch (more nodes), see megatron_tppo/planning/projection.py.")
    return "\n".join(lines)

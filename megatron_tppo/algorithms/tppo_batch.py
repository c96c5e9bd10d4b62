"""Turn one step's window-pool output into the policy and critic training batches (TPPO.md 2-3).

Policy batch: one row per segment (the tokens a sample generated in this window). The row holds
the full context (prompt + response up to the segment's end) so earlier windows are in the
forward pass, but only the segment's positions carry loss ("selective filtering"). Advantages are
EGAE over the segment with the length-adaptive policy lambda, the last ``truncated_tail_ignore``
advantages of a truncated segment zeroed, whitened over the batch and clamped.

Critic batch: one row per response that finished this step, all its windows, regressing the
critic-lambda return (Monte-Carlo at lambda = 1) against the values stored with its tokens when
they were generated (the "old" values of the clipped value loss).

Tensor layout (what the training engine takes): ``tokens`` [B, T] long right-padded with 0,
``attention_mask`` [B, T], ``loss_mask`` [B, T], per-token fields [B, T] aligned to tokens (index t
describes token t), per-row fields [B]. Pure torch; no distributed code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_tppo.algorithms.egae import adaptive_policy_lambda, compute_egae, policy_lambda_lengths
from megatron_tppo.algorithms.losses import masked_whiten, truncated_tail_mask


@dataclass
class SegmentInput:
    """One segment to train the policy on (built from a window-pool Segment plus critic values)."""

    token_ids: list[int]
    """Prompt + response[:end]."""
    prompt_len: int
    start: int
    """Segment = response positions [start, end)."""
    end: int
    logprobs: list[float]
    """Behaviour log-probs of the segment tokens, length end - start."""
    values: list[float]
    """Critic values V(s_t) of the segment tokens, length end - start."""
    finished: bool
    reward: float = 0.0
    """Final reward; used only when ``finished``."""
    value_after: Optional[float] = None
    """V(s_l), the value after the segment's last token: the exact bootstrap of a truncated
    segment. None: ``V(s_l) := V(s_{l-1})`` (TPPO.md)."""


@dataclass
class ResponseInput:
    """One finished response to train the critic on."""

    token_ids: list[int]
    """Prompt + the whole response."""
    prompt_len: int
    old_values: list[float]
    """Values stored with each response token when it was generated, length len(response)."""
    reward: float


def pad_token_rows(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Token-id rows -> [B, width] long, right-padded with 0."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def row_attention_mask(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[B, width] long, 1 on each row's real tokens."""
    lengths = torch.tensor([len(r) for r in rows])
    return (torch.arange(width)[None] < lengths[:, None]).long()


def _place(rows: Sequence[Sequence[float]], starts: Sequence[int], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, (r, s) in enumerate(zip(rows, starts)):
        out[i, s: s + len(r)] = torch.as_tensor(r, dtype=torch.float32)
    return out


def policy_batch(segments: Sequence[SegmentInput], *, gamma: float = 1.0, lambda_alpha: float = 0.05,
                 lambda_min: float = 0.95, window_tokens: int = 8192, tail_ignore: int = 0,
                 advantage_clamp: float = 10.0, whiten: str = "mean_std",
                 pad_width: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Policy rows for this step's segments; see the module docstring.

    ``whiten``: ``mean_std`` (subtract the batch mean, divide by the std), ``std`` (divide only:
    a truncated segment's near-zero advantages stay near zero) or ``none``. A truncated segment
    with ``value_after`` bootstraps from it; without, from its last value.

    Returns the batch dict plus ``num_tokens`` (0-dim, the global loss-token count of this batch)
    and per-row ``finished`` / ``positive`` (finished with reward >= 1, for the positive LM loss).
    """
    if not segments:
        raise ValueError("policy_batch needs at least one segment")
    for i, s in enumerate(segments):
        n = s.end - s.start
        if n <= 0 or len(s.logprobs) != n or len(s.values) != n or len(s.token_ids) != s.prompt_len + s.end:
            raise ValueError(f"segment {i}: inconsistent lengths (start={s.start}, end={s.end}, "
                             f"{len(s.logprobs)} logprobs, {len(s.values)} values, {len(s.token_ids)} tokens)")
    width = pad_width or max(len(s.token_ids) for s in segments)
    tokens = pad_token_rows([s.token_ids for s in segments], width)
    attention = row_attention_mask([s.token_ids for s in segments], width)
    starts = [s.prompt_len + s.start for s in segments]
    ones = [[1.0] * (s.end - s.start) for s in segments]
    loss_mask = _place(ones, starts, width).bool()
    old_logprobs = _place([s.logprobs for s in segments], starts, width)
    values = _place([s.values for s in segments], starts, width)
    finished = torch.tensor([s.finished for s in segments])
    rewards = torch.zeros(len(segments), width)
    for i, s in enumerate(segments):
        if s.finished:
            rewards[i, s.prompt_len + s.end - 1] = float(s.reward)

    lam = adaptive_policy_lambda(
        policy_lambda_lengths(torch.tensor([s.end for s in segments]), finished, window_tokens),
        lambda_alpha, lambda_min)
    boot = None
    if any(s.value_after is not None for s in segments if not s.finished):
        missing = [i for i, s in enumerate(segments) if not s.finished and s.value_after is None]
        if missing:
            raise ValueError(f"segments {missing[:5]}: truncated without value_after while others have it")
        boot = torch.tensor([s.value_after if s.value_after is not None else 0.0 for s in segments])
    adv, _ = compute_egae(rewards, values, loss_mask, finished, gamma=gamma, lam=lam, bootstrap=boot)
    keep = truncated_tail_mask(loss_mask, finished, tail_ignore)
    # the tail's advantage is zeroed (recipe); it neither shapes the whitening stats nor pushes the policy
    if whiten == "none":
        adv = adv * keep
        if advantage_clamp > 0:
            adv = adv.clamp(-advantage_clamp, advantage_clamp)
    elif whiten in ("mean_std", "std"):
        adv = masked_whiten(adv, keep, clamp=advantage_clamp, center=whiten == "mean_std")
    else:
        raise ValueError(f"whiten must be 'mean_std', 'std' or 'none', got {whiten!r}")
    positive = finished & torch.tensor([s.reward >= 1.0 for s in segments])
    return {
        "tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask.float(),
        "old_logprobs": old_logprobs, "advantages": adv, "values": values,
        "finished": finished, "positive": positive, "lambda": lam,
        "num_tokens": loss_mask.sum(),
    }


def critic_batch(responses: Sequence[ResponseInput], *, gamma: float = 1.0, lam: float = 1.0,
                 pad_width: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Critic rows for the responses that finished this step (whole responses, all windows)."""
    if not responses:
        raise ValueError("critic_batch needs at least one finished response")
    for i, r in enumerate(responses):
        if len(r.old_values) != len(r.token_ids) - r.prompt_len or len(r.old_values) == 0:
            raise ValueError(f"response {i}: {len(r.old_values)} values for "
                             f"{len(r.token_ids) - r.prompt_len} response tokens")
    width = pad_width or max(len(r.token_ids) for r in responses)
    tokens = pad_token_rows([r.token_ids for r in responses], width)
    attention = row_attention_mask([r.token_ids for r in responses], width)
    starts = [r.prompt_len for r in responses]
    loss_mask = _place([[1.0] * len(r.old_values) for r in responses], starts, width).bool()
    old_values = _place([r.old_values for r in responses], starts, width)
    rewards = torch.zeros(len(responses), width)
    for i, r in enumerate(responses):
        rewards[i, len(r.token_ids) - 1] = float(r.reward)
    finished = torch.ones(len(responses), dtype=torch.bool)
    _, returns = compute_egae(rewards, old_values, loss_mask, finished, gamma=gamma, lam=lam)
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask.float(),
            "old_values": old_values, "returns": returns, "num_tokens": loss_mask.sum()}

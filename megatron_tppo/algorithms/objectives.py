"""The policy and critic objectives in the training engine's loss contract.

``fn(outputs, micro_batch, global_num_tokens) -> (loss, metrics)``: ``outputs`` holds the engine's
per-token ``logprobs`` (+ ``entropy``) or ``values`` for the micro-batch's rows; the micro-batch
carries the fields built by :mod:`megatron_tppo.algorithms.tppo_batch`. Every loss and metric is a
sum over this micro-batch's loss tokens divided by the global count, so they add up across
micro-batches and ranks (the engine sums them), except metrics named ``*_max``: this
micro-batch's maximum, which the engine max-reduces. Bind the settings with ``functools.partial``;
the result pickles, so it can be shipped to trainer processes.
"""
from __future__ import annotations

import torch

from megatron_tppo.algorithms.losses import (
    entropy_loss,
    kl_penalty,
    policy_loss,
    positive_lm_loss,
    token_mean,
    value_loss,
)


def policy_objective(outputs: dict, mb: dict, num_tokens: float, *, clip_low: float = 0.2,
                     clip_high: float = 0.28, dual_clip: float = 10.0, positive_lm_coef: float = 0.0,
                     entropy_coef: float = 0.0, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """PPO surrogate + positive-example LM loss - entropy bonus + KL to the reference (optional)."""
    logp, mask = outputs["logprobs"], mb["loss_mask"]
    pg, m = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, num_tokens,
                        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    metrics = {k: v for k, v in m.items() if k not in ("ratio_max", "ratio_min")}  # not additive
    metrics["pg_loss"] = pg.detach()
    # train vs rollout mismatch: in a step's first update, logp comes from the weights that
    # generated the window (mean over loss tokens, and the largest one; 0 when there are none)
    diff = (logp - mb["old_logprobs"]).abs().detach()
    metrics["logprob_abs_diff"] = token_mean(diff, mask, num_tokens)
    metrics["logprob_abs_diff_max"] = torch.where(mask > 0, diff, 0.0).max() if diff.numel() else diff.new_zeros(())
    loss = pg
    if positive_lm_coef > 0:
        lm, _ = positive_lm_loss(logp, mask, mb["positive"], num_tokens)
        loss = loss + positive_lm_coef * lm
        metrics["lm_loss"] = lm.detach()
    if "entropy" in outputs:
        ent, _ = entropy_loss(outputs["entropy"], mask, num_tokens)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    if kl_coef > 0:
        if "ref_logprobs" not in mb:
            raise KeyError("kl_coef > 0 needs 'ref_logprobs' in the batch")
        kl, _ = kl_penalty(logp, mb["ref_logprobs"], mask, num_tokens)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def critic_objective(outputs: dict, mb: dict, num_tokens: float, *, value_clip: float = 0.5
                     ) -> tuple[torch.Tensor, dict]:
    """Clipped value regression onto the returns of finished responses."""
    v, mask = outputs["values"], mb["loss_mask"]
    loss, m = value_loss(v, mb["old_values"], mb["returns"], mask, num_tokens, clip=value_clip)
    m["value_loss"] = loss.detach()
    # sums for the explained variance, reduced by the caller: E[R], E[R^2], E[(R-V)], E[(R-V)^2]
    r, d = mb["returns"], (mb["returns"] - v).detach()
    m.update(ret_mean=token_mean(r, mask, num_tokens), ret_sq=token_mean(r * r, mask, num_tokens),
             err_mean=token_mean(d, mask, num_tokens), err_sq=token_mean(d * d, mask, num_tokens))
    return loss, m


def explained_variance_from_sums(m: dict) -> float:
    """1 - Var(R - V) / Var(R) from the token-mean sums that :func:`critic_objective` reports."""
    var_r = m["ret_sq"] - m["ret_mean"] ** 2
    var_e = m["err_sq"] - m["err_mean"] ** 2
    return float(1.0 - var_e / var_r) if var_r > 1e-12 else 0.0

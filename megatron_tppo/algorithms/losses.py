"""T-PPO losses (TPPO.md section 4), token-level with explicit global normalizers.

Every loss takes ``num_tokens``: the number of valid (loss-bearing) tokens in the whole global
mini-batch, computed by the caller before micro-batching. A loss is ``sum(per_token * mask) /
num_tokens``, so summing the losses of all micro-batches, pipeline splits and data-parallel ranks
gives exactly the global token mean, whatever the split. Never normalize by a per-micro-batch
count here.

Metrics follow the same rule where they are means (``*_sum`` style: each is already divided by
``num_tokens``, so they add up across micro-batches); extrema (``ratio_max``...) are reduced with
max/min by the caller. Every function returns ``(loss, metrics)`` with 0-dim tensors in metrics.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Number = Union[int, float, torch.Tensor]


def _check(mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    for t in tensors:
        if t.shape != mask.shape:
            raise ValueError(f"tensor of shape {tuple(t.shape)} does not match the mask {tuple(mask.shape)}")
    return mask.to(tensors[0].dtype if tensors else torch.float32)


def _denominator(num_tokens: Number) -> torch.Tensor:
    n = torch.as_tensor(num_tokens, dtype=torch.float32)
    # An all-empty batch gives loss 0 (0 / 1), not NaN.
    return torch.clamp(n, min=1.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum()


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: Number) -> torch.Tensor:
    """``sum(x * mask) / num_tokens``: the global-token-mean contribution of this micro-batch."""
    return masked_sum(x, mask) / _denominator(num_tokens).to(x.dtype)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: Number,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float = 10.0,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate with clip-higher and dual clip, token-level.

    Per token, with ``ratio = exp(logp - old_logp)``::

        pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A * dual_clip)   where A < 0 (dual clip; 0 disables it)

    Args:
        logprobs, old_logprobs, advantages, mask: [B, T]; ``old_logprobs`` are the behaviour
            (rollout) log-probs of the window that produced each token.
        num_tokens: global count of valid tokens in the mini-batch.
    Returns:
        loss (0-dim) and metrics: clip_fraction (ratio clipped by the PPO clip), dual_clip_fraction,
        ratio_mean, approx_kl (``0.5 * (logp - old)^2``), all as global-token-mean contributions;
        ratio_max / ratio_min over this micro-batch's valid tokens.
    """
    m = _check(mask, logprobs, old_logprobs, advantages)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(m.dtype)
    dual = torch.zeros_like(m)
    if dual_clip > 0:
        pg3 = -advantages * dual_clip
        use_dual = (advantages < 0) & (pg > pg3)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
        dual = use_dual.to(m.dtype)
    loss = token_mean(pg, m, num_tokens)
    valid = m.bool()
    with torch.no_grad():
        big = torch.finfo(ratio.dtype).max
        metrics = {
            "clip_fraction": token_mean(clipped, m, num_tokens),
            "dual_clip_fraction": token_mean(dual, m, num_tokens),
            "ratio_mean": token_mean(ratio, m, num_tokens),
            "approx_kl": token_mean(0.5 * log_ratio.pow(2), m, num_tokens),
            "ratio_max": torch.where(valid, ratio, -big).max() if valid.any() else ratio.new_tensor(1.0),
            "ratio_min": torch.where(valid, ratio, big).min() if valid.any() else ratio.new_tensor(1.0),
        }
    return loss, metrics


def positive_lm_loss(logprobs: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor,
                     num_tokens: Number) -> tuple[torch.Tensor, dict]:
    """VAPO positive-example LM loss: NLL of the tokens of responses with reward 1.

    Args:
        logprobs, mask: [B, T]; positive: [B] bool (the row's response got reward 1).
        num_tokens: the global normalizer (the caller chooses: count of positive tokens, or the
            policy's valid-token count so the weight is relative to the PPO term).
    """
    m = _check(mask, logprobs) * positive.to(logprobs.dtype).view(-1, 1)
    loss = token_mean(-logprobs, m, num_tokens)
    return loss, {"positive_tokens": m.sum().detach()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               num_tokens: Number, clip: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, ``V_clip = V_old + clip(V - V_old, +-clip)``.

    ``clip = 0`` disables clipping (plain squared error). Metrics: value_clip_fraction,
    value_mean (global-token-mean contributions).
    """
    m = _check(mask, values, old_values, returns)
    err = (values - returns).pow(2)
    if clip > 0:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clip = (v_clip - returns).pow(2)
        per_tok = 0.5 * torch.maximum(err, err_clip)
        clipped = (err_clip > err).to(m.dtype)
    else:
        per_tok = 0.5 * err
        clipped = torch.zeros_like(m)
    loss = token_mean(per_tok, m, num_tokens)
    with torch.no_grad():
        metrics = {"value_clip_fraction": token_mean(clipped, m, num_tokens),
                   "value_mean": token_mean(values, m, num_tokens)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of a categorical over the last dim. [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, num_tokens: Number) -> tuple[torch.Tensor, dict]:
    """Mean token entropy (to be subtracted with a coefficient as a bonus)."""
    m = _check(mask, entropy)
    ent = token_mean(entropy, m, num_tokens)
    return ent, {"entropy": ent.detach()}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: Number,
               kind: str = "k3") -> tuple[torch.Tensor, dict]:
    """KL(pi || pi_ref) estimate per sampled token, token-mean.

    kind: "k1" (``logp - ref``), "k2" (``0.5 (logp - ref)^2``) or "k3" (``exp(ref - logp) - (ref - logp) - 1``,
    unbiased and non-negative; the usual choice).
    """
    m = _check(mask, logprobs, ref_logprobs)
    d = ref_logprobs - logprobs
    if kind == "k1":
        per_tok = -d
    elif kind == "k2":
        per_tok = 0.5 * d.pow(2)
    elif kind == "k3":
        per_tok = torch.exp(d) - d - 1.0
    else:
        raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    kl = token_mean(per_tok, m, num_tokens)
    return kl, {"kl": kl.detach()}


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, clamp: float = 10.0, eps: float = 1e-8,
                  stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None, center: bool = True) -> torch.Tensor:
    """Whiten ``x`` over its valid tokens and clamp to +-``clamp`` (0 disables the clamp).

    ``center=False`` divides by the standard deviation without subtracting the mean, so a token
    whose ``x`` is 0 stays 0 (the mean still sets the variance).

    Args:
        x, mask: [B, T].
        stats: optional precomputed (mean, var) over the global batch (e.g. reduced across
            data-parallel ranks); by default computed from the valid tokens of ``x``.
    Returns:
        [B, T], 0 where the mask is 0. Variance is the population variance.
    """
    m = _check(mask, x)
    if stats is None:
        n = m.sum().clamp(min=1.0)
        mean = (x * m).sum() / n
        var = ((x - mean).pow(2) * m).sum() / n
    else:
        mean, var = stats
    out = ((x - mean) if center else x) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype) + eps)
    if clamp > 0:
        out = out.clamp(-clamp, clamp)
    return out * m


def truncated_tail_mask(mask: torch.Tensor, finished: torch.Tensor, n_ignore: int) -> torch.Tensor:
    """Drop the last ``n_ignore`` valid tokens of every truncated (not finished) row from ``mask``.

    Args:
        mask: [B, T] bool/0-1 over this window's segment; finished: [B] bool.
    Returns:
        bool [B, T]. Finished rows are unchanged; a truncated row shorter than ``n_ignore`` loses all.
    """
    mb = mask.bool()
    if n_ignore <= 0:
        return mb
    # rank of each valid token counted from the row's end: 1 for the last valid token
    from_end = torch.flip(torch.cumsum(torch.flip(mb.to(torch.int64), [1]), 1), [1])
    tail = mb & (from_end <= n_ignore) & ~finished.bool().view(-1, 1)
    return mb & ~tail


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over valid tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    m = _check(mask, values, returns)
    n = m.sum().clamp(min=1.0)

    def var(z: torch.Tensor) -> torch.Tensor:
        mu = (z * m).sum() / n
        return ((z - mu).pow(2) * m).sum() / n

    vr = var(returns)
    return torch.where(vr > 0, 1.0 - var(returns - values) / vr.clamp(min=1e-12), torch.zeros_like(vr))

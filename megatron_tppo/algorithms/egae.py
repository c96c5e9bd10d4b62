"""Extended GAE (EGAE) for finished and truncated response segments (TPPO.md section 2).

For one row, over its valid tokens in order (t = 0 .. n-1 of the segment)::

    delta_t = r_t + gamma * V_next(t) - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t

``V_next(t)`` is the value of the next valid token; after the last valid token it is 0 when the
row finished in this segment and the last token's own value when it did not (the EGAE bootstrap
``V(s_l) := V(s_{l-1})``: a truncated response has no estimate for the state after the window).

The shipped implementation is vectorized over rows and uses a chunked scan over time: inside a
chunk of C tokens the discounted suffix sum is one batched matmul with a [C, C] matrix of powers of
``gamma * lam`` (never a power above C, so no under/overflow for long sequences), and chunks are
chained right to left with one carry each. The plain per-row loop that defines the semantics lives
in the tests as the oracle.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

_CHUNK = 64


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that moves each row's valid positions to the front, keeping their order.

    Returns ``order`` [B, T] (gather indices) and ``n_valid`` [B].
    """
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    # valid positions keep their index, invalid ones are pushed behind all valid ones
    key = torch.where(mask, pos, pos + T)
    order = torch.argsort(key, dim=1, stable=True)
    return order, mask.sum(dim=1)


def discounted_suffix_sum(x: torch.Tensor, discount: torch.Tensor) -> torch.Tensor:
    """``y_t = x_t + discount * y_{t+1}`` along dim 1, with ``y_T = 0``.

    Args:
        x: [B, T] float.
        discount: [B] float in [0, 1] (per-row discount).
    Returns:
        [B, T], same dtype as ``x``.
    """
    B, T = x.shape
    if T == 0:
        return x.clone()
    C = min(_CHUNK, T)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    xp = torch.nn.functional.pad(x, (0, pad)).view(B, n_chunks, C)
    idx = torch.arange(C, device=x.device, dtype=x.dtype)
    expo = idx.view(1, C) - idx.view(C, 1)  # [C(i), C(j)] = j - i
    upper = expo >= 0
    d = discount.to(x.dtype).view(B, 1, 1)
    # M[b, i, j] = d_b ** (j - i) for j >= i else 0; pow(0, 0) == 1 keeps lam = 0 exact
    M = torch.where(upper, torch.pow(d, expo.clamp(min=0)), torch.zeros((), dtype=x.dtype))
    local = torch.einsum("bij,bkj->bki", M, xp)  # suffix sums inside each chunk
    carry_w = torch.pow(discount.to(x.dtype).view(B, 1), (C - idx).view(1, C))  # d^(C-i)
    out = torch.empty_like(local)
    carry = torch.zeros(B, 1, dtype=x.dtype, device=x.device)
    for k in range(n_chunks - 1, -1, -1):
        out[:, k] = local[:, k] + carry_w * carry
        carry = out[:, k, :1]
    return out.view(B, n_chunks * C)[:, :T]


def compute_egae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    finished: torch.Tensor,
    gamma: float = 1.0,
    lam: Union[float, torch.Tensor] = 0.95,
    bootstrap: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EGAE advantages and value targets for one window's segments.

    Args:
        token_rewards: [B, T] float, reward on each token (usually only on the final token).
        values: [B, T] float, critic value V(s_t) of each token position.
        response_mask: [B, T] bool or 0/1, 1 on the loss-bearing tokens of this window's segment
            (rows may start at different offsets and be right-padded).
        finished: [B] bool, the response ended (EOS or length cap) inside this segment.
        gamma: discount.
        lam: GAE lambda, a float or a [B] tensor (per-row, for the length-adaptive policy lambda).
        bootstrap: optional [B] value of the state after a truncated row's last valid token,
            V(s_l). None: ``V(s_l) := V(s_{l-1})``, the row's last value (TPPO.md). Finished
            rows ignore it (their next value is 0).
    Returns:
        (advantages, returns), both [B, T] in the dtype of ``values``; exactly 0 where the mask
        is 0. ``returns = advantages + values`` on valid tokens. No whitening.
    """
    if token_rewards.shape != values.shape or values.shape != response_mask.shape or values.dim() != 2:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all be the same [B, T] shape")
    B, T = values.shape
    finished = torch.as_tensor(finished, device=values.device).bool().reshape(-1)
    if finished.numel() != B:
        raise ValueError(f"finished has {finished.numel()} entries for {B} rows")
    dtype = values.dtype if values.is_floating_point() else torch.float32
    mask = response_mask.bool()
    lam_t = torch.as_tensor(lam, dtype=dtype, device=values.device)
    lam_t = lam_t.expand(B) if lam_t.dim() == 0 else lam_t.reshape(-1)
    if lam_t.numel() != B:
        raise ValueError(f"lam has {lam_t.numel()} entries for {B} rows")

    order, n_valid = _compact(mask)
    r = torch.gather(token_rewards.to(dtype), 1, order)
    v = torch.gather(values.to(dtype), 1, order)
    pos = torch.arange(T, device=values.device).view(1, T)
    valid = pos < n_valid.view(B, 1)
    r = torch.where(valid, r, 0.0)
    v = torch.where(valid, v, 0.0)

    # V_next: next valid token's value; after the last one 0 if finished, else its own value.
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    last = (n_valid - 1).clamp(min=0).view(B, 1)
    v_last = torch.gather(v, 1, last).squeeze(1)
    if bootstrap is not None:
        boot = torch.as_tensor(bootstrap, dtype=dtype, device=values.device).reshape(-1)
        if boot.numel() != B:
            raise ValueError(f"bootstrap has {boot.numel()} entries for {B} rows")
        v_last = boot
    bootstrap = torch.where(finished, torch.zeros_like(v_last), v_last)
    is_last = pos == last
    v_next = torch.where(is_last, bootstrap.view(B, 1), v_next)

    delta = torch.where(valid, r + gamma * v_next - v, 0.0)
    adv_c = discounted_suffix_sum(delta, gamma * lam_t)
    adv_c = torch.where(valid, adv_c, 0.0)

    advantages = torch.zeros(B, T, dtype=dtype, device=values.device).scatter(1, order, adv_c)
    returns = torch.where(mask, advantages + values.to(dtype), 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, returns


def adaptive_policy_lambda(lengths: torch.Tensor, alpha: float = 0.05, min_lambda: float = 0.95) -> torch.Tensor:
    """VAPO length-adaptive policy lambda: ``max(min_lambda, 1 - 1 / (alpha * L))`` per row.

    Args:
        lengths: [B] response lengths L (tokens; float or int).
    Returns:
        [B] float32 lambdas.
    """
    L = lengths.to(torch.float32).clamp(min=1e-6)
    return torch.clamp(1.0 - 1.0 / (alpha * L), min=min_lambda, max=1.0)


def policy_lambda_lengths(length_so_far: torch.Tensor, finished: torch.Tensor, window_tokens: int) -> torch.Tensor:
    """The L fed to :func:`adaptive_policy_lambda`.

    A finished response uses its length; a truncated one its length so far plus half a window
    (the reference recipe's estimate of where it will end).

    Args:
        length_so_far: [B] response tokens generated up to the end of this segment.
        finished: [B] bool.
    """
    L = length_so_far.to(torch.float32)
    return torch.where(finished.bool(), L, L + 0.5 * window_tokens)


def monte_carlo_returns(token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Critic targets of finished responses: discounted reward-to-go over valid tokens (lambda = 1).

    Args:
        token_rewards: [B, T]; response_mask: [B, T] over the whole response (all windows).
    Returns:
        [B, T] returns, 0 where the mask is 0. Equals ``compute_egae(..., finished=True, lam=1)[1]``
        for any values (the value terms telescope), which the tests check.
    """
    mask = response_mask.bool()
    B, T = mask.shape
    dtype = token_rewards.dtype if token_rewards.is_floating_point() else torch.float32
    order, n_valid = _compact(mask)
    r = torch.gather(token_rewards.to(dtype), 1, order)
    valid = torch.arange(T, device=mask.device).view(1, T) < n_valid.view(B, 1)
    r = torch.where(valid, r, 0.0)
    g = torch.full((B,), float(gamma), dtype=dtype, device=mask.device)
    ret_c = torch.where(valid, discounted_suffix_sum(r, g), 0.0)
    out = torch.zeros(B, T, dtype=dtype, device=mask.device).scatter(1, order, ret_c)
    return torch.where(mask, out, 0.0)

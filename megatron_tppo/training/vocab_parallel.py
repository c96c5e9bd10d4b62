"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary,
[..., V_pad / tp]. Only per-token scalars cross ranks: the max, the sum of exponentials, the target
logit and (for entropy) sum(p * logit) are all-reduced over the TP group. Padded vocabulary rows
(ids >= ``vocab_size``) are excluded from the softmax so log-probs match an unpadded HF/vLLM model.

Temperature: the distribution is softmax(logits / T), the one vLLM samples from and whose
log-probs it reports as ``processed_logprobs`` (before any top-k/top-p truncation, which is not
reproduced here; see :mod:`megatron_tppo.rollout.vllm_backend`). T = 1 is the model's own.

One autograd Function computes both outputs and a fused backward that keeps only the local
softmax (and the shifted logits when entropy is asked for); with z = l / T:

    d logp_t / d l_v = (1[v = t] - p_v) / T
    d H      / d l_v = -p_v * (log p_v + H) / T

:func:`reference_logprobs_entropy` is the plain full-vocabulary version the tests compare against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_start, vocab_size, with_entropy, temperature):
        local = logits.float()
        n_valid = max(0, min(local.shape[-1], vocab_size - vocab_start))
        local = local[..., :n_valid]  # drop padded vocabulary rows held by this rank
        if n_valid > 0:
            m = local.max(dim=-1).values
        else:
            m = torch.full(local.shape[:-1], float("-inf"), dtype=local.dtype, device=local.device)
        _all_reduce(m, dist.ReduceOp.MAX, tp_group)
        shifted = local - m.unsqueeze(-1)  # a new tensor: scaling it in place costs no memory
        if temperature != 1.0:
            shifted.mul_(1.0 / temperature)  # max(l / T) = max(l) / T for T > 0
        p = shifted.exp()
        s = p.sum(dim=-1)
        in_range = (target >= vocab_start) & (target < vocab_start + n_valid)
        idx = (target - vocab_start).clamp(0, max(n_valid - 1, 0))
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) if n_valid > 0 else torch.zeros_like(s)
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        if with_entropy:
            sum_pl = (p * shifted).sum(dim=-1)
            stacked = _all_reduce(torch.stack([s, picked, sum_pl]), dist.ReduceOp.SUM, tp_group)
            s, picked, sum_pl = stacked[0], stacked[1], stacked[2]
        else:
            stacked = _all_reduce(torch.stack([s, picked]), dist.ReduceOp.SUM, tp_group)
            s, picked = stacked[0], stacked[1]
        log_s = s.log()
        logp = picked - log_s
        p.div_(s.unsqueeze(-1))
        entropy = log_s - sum_pl / s if with_entropy else None
        ctx.with_entropy, ctx.temperature = with_entropy, temperature
        ctx.full_width = logits.shape[-1]
        ctx.in_dtype = logits.dtype
        if with_entropy:
            ctx.save_for_backward(p, idx, in_range, shifted, log_s, entropy)
        else:
            ctx.save_for_backward(p, idx, in_range)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        if ctx.with_entropy:
            p, idx, in_range, shifted, log_s, entropy = ctx.saved_tensors
        else:
            p, idx, in_range = ctx.saved_tensors
        grad = p * (-g_logp).unsqueeze(-1)
        if grad.shape[-1] > 0:
            grad.scatter_add_(-1, idx.unsqueeze(-1), (g_logp * in_range.to(g_logp.dtype)).unsqueeze(-1))
        if ctx.with_entropy and g_entropy is not None:
            logp_all = shifted - log_s.unsqueeze(-1)
            grad -= p * (logp_all + entropy.unsqueeze(-1)) * g_entropy.unsqueeze(-1)
        if ctx.temperature != 1.0:
            grad.mul_(1.0 / ctx.temperature)
        pad = ctx.full_width - grad.shape[-1]
        if pad:
            grad = torch.nn.functional.pad(grad, (0, pad))
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``target`` and (optionally) the entropy of the next-token distribution
    softmax(logits / ``temperature``).

    logits: [..., V_pad / tp] this rank's vocabulary slice (rank r holds ids [r*Vl, (r+1)*Vl)).
    target: [...] token ids (long). vocab_size: real vocabulary size (ids >= it are padding).
    temperature: > 0. Returns (logprobs [...], entropy [...] or None), fp32, identical on every TP rank.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vocab_start = tp_rank * logits.shape[-1]
    logp, ent = _VocabParallelLogProbEntropy.apply(logits, target, tp_group, vocab_start, vocab_size,
                                                   with_entropy, float(temperature))
    return logp, (ent if with_entropy else None)


def reference_logprobs_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain full-vocabulary reference: logits [..., V_pad] -> (logprobs [...], entropy [...]) of
    softmax(logits / temperature)."""
    logsm = torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)
    logp = logsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy

"""What the vLLM engine, its stream session and its worker extension share.

:mod:`~megatron_tppo.rollout.vllm_backend`, :mod:`~megatron_tppo.rollout.vllm_stream` and
:mod:`~megatron_tppo.rollout.vllm_ext` (loaded inside vLLM's worker processes) all import from
here, and this module imports none of them, so none of the three needs another to get these.
It imports neither vLLM nor torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import torch


def sampled_logprobs(token_ids: Sequence[int], per_position) -> list[float]:
    """vLLM's per-position {token id: Logprob} -> the log-prob of the token actually there."""
    if per_position is None:
        raise RuntimeError("vLLM returned no log-probs; was logprobs=0 passed?")
    return [float(pos[int(tok)].logprob) for tok, pos in zip(token_ids, per_position)]


def with_tied_lm_head(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Feed the embedding to a tied model's lm_head too.

    vLLM ties lm_head.weight to the embedding Parameter, but on CPU the lm_head also keeps a
    oneDNN-packed copy made when its layer is processed; a reload that names only the embedding
    leaves that copy stale (measured: logits of the old model). Naming ``lm_head.weight`` makes
    vLLM reprocess the layer. A separately given ``lm_head.weight`` (HF state dicts of tied models
    carry the same tensor) is dropped so the layer is loaded once.
    """
    for name, tensor in weights:
        if name == "lm_head.weight":
            continue
        yield name, tensor
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor

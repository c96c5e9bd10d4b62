"""The generation interface every rollout backend implements, and the data it returns.

Token ids in, token ids out: the window pool resumes a truncated response from
``prompt + generated so far`` as token ids (never by re-tokenizing text), so no backend needs a
tokenizer. Each sequence carries its own ``max_tokens``: a window-pool slot generates
``min(W, L_max - generated)`` tokens, which differs per slot.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence, Union

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How to sample (shared by all sequences of one ``generate`` call)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus threshold; 1 keeps the whole vocabulary."""
    seed: Optional[int] = None
    """Base seed: prompt ``i`` samples with ``seed + i * n`` (its n samples with ``+ 0..n-1``)."""


@dataclass
class GenerationResult:
    """One generated continuation of one prompt.

    ``logprobs[t]`` is the log-probability of ``token_ids[t]`` under the distribution it was
    sampled from (see the backend for what that means at temperature != 1 or top_p < 1), so
    ``len(logprobs) == len(token_ids)``; these are the behaviour ("old") log-probs of PPO.
    """

    token_ids: list[int]
    """New tokens only (the prompt is not repeated); ends with the stop token when finished."""
    logprobs: list[float]
    """Per-token log-probs of the sampled tokens, [len(token_ids)], natural log."""
    finish_reason: FinishReason
    """"stop": a stop/EOS token ended it; "length": its max_tokens (or the context) ran out."""
    policy_version: int
    """Version of the weights that generated it (set by ``load_weights``)."""
    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    sample_index: int = 0
    """Which of the ``n`` samples of that prompt."""


class RolloutEngine(abc.ABC):
    """A generation backend: token-id prompts in, tokens + behaviour log-probs out."""

    policy_version: int = 0
    """Stamp of the loaded weights; ``load_weights`` sets it, every result carries it."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: Union[int, Sequence[int]],
                 sampling: Sampling = Sampling(), n: int = 1) -> list[GenerationResult]:
        """Continue every prompt.

        Args:
            prompts: token-id lists, [num_prompts][prompt_len_i].
            max_tokens: new-token budget, one int for all or one per prompt (0 yields an empty
                "length" result without touching the engine).
            sampling: temperature / top_p / seed.
            n: samples per prompt.
        Returns:
            ``num_prompts * n`` results, prompt-major (``results[i * n + j]`` is sample j of
            prompt i).
        """

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the model weights in place from (HF name, full tensor) pairs; stamp ``version``.

        The iterator is consumed once and may be lazy (weights streamed from the trainer); it must
        hold every tensor of each layer it touches. Cached prefixes computed with the old weights
        are dropped.
        """

    def release_memory(self) -> None:
        """Free accelerator memory (weights, KV cache) while the trainer runs; no-op on CPU."""

    def restore_memory(self) -> None:
        """Undo :meth:`release_memory` before the next ``generate``/``load_weights``."""

    def shutdown(self) -> None:
        """Stop the engine and free its resources."""


def normalize_max_tokens(max_tokens: Union[int, Sequence[int]], num_prompts: int) -> list[int]:
    """One int or a per-prompt list -> a per-prompt list, checked (no negative budgets)."""
    if isinstance(max_tokens, int):
        budgets = [max_tokens] * num_prompts
    else:
        budgets = [int(b) for b in max_tokens]
        if len(budgets) != num_prompts:
            raise ValueError(f"max_tokens has {len(budgets)} entries for {num_prompts} prompts")
    if any(b < 0 for b in budgets):
        raise ValueError(f"max_tokens must be >= 0, got {min(budgets)}")
    return budgets

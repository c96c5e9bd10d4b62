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

from megatron_tppo.rollout.stream import StreamRequest, StreamUpdate

FinishReason = Literal["stop", "length"]

StartWeights = Literal["checkpoint", "dummy"]
"""What an engine holds when it starts (``from_config(..., weights=)``). "checkpoint": the model
directory's weights, read from disk. "dummy": placeholder values, only the directory's config is
read; for a caller whose first act is a weight sync (the T-PPO driver syncs the policy into the
engines before step 1), which then overwrites every tensor. Such an engine refuses to generate
until weights were loaded into it."""


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

    @classmethod
    def from_config(cls, model_path: str, rollout, model, *,
                    weights: StartWeights = "checkpoint") -> "RolloutEngine":
        """Build from :class:`~megatron_tppo.config.RolloutConfig` and ``ModelConfig`` (what the
        controller calls). ``weights``: see :data:`StartWeights`; only a caller that loads weights
        before it generates may pass "dummy"."""
        raise TypeError(f"{cls.__name__} cannot be built from a config")

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

    def stream(self, requests: Sequence[StreamRequest], budget: int, sampling: Sampling = Sampling(),
               expect_more: bool = True) -> StreamUpdate:
        """Continuous generation with refill (``rollout.refill=continuous``), one call at a time.

        A *stream* opens with the first call and stays open across calls until an update comes
        back with ``closed=True``. Between calls the engine keeps its running requests (their KV
        cache and the tokens they generated) and generates nothing; while a stream is open, call
        no other method of this engine (``generate`` would run the stream's requests too, and
        ``load_weights`` would change the weights under them: every token of a stream must come
        from one policy version).

        Each call:

        1. ``requests`` join the stream. One with a ``slot`` starts at once in that slot, which
           must be free (not used yet in this stream, or its request ended); one without waits
           in a FIFO queue. Keys must be unique within the stream.
        2. Every free slot takes the queue's head (a :class:`StreamStart` event).
        3. Iterations of continuous batching follow: every running request gains (at most) one
           token per iteration. A request ends on a stop token (finish "stop") or at its
           ``max_tokens`` ("length"); a :class:`StreamResult` event then carries everything it
           generated in this stream, and its slot takes the queue's head before the next
           iteration, so a slot never waits for the others.
        4. The call returns when one of these happens first:

           * ``budget`` tokens were generated in this call (all requests together): every
             running request ends "truncated" (its tokens so far, to be continued later from
             ``token_ids + result.token_ids``), queued requests come back in
             ``StreamUpdate.unstarted``, and the stream closes. The budget is never exceeded:
             when fewer tokens are left than requests run, the excess requests (highest slots
             first) are truncated before the iteration; tokens delivered beyond it are dropped;
           * a slot is free, the queue is empty and ``expect_more``: the caller should send the
             next requests (the stream stays open; at least one iteration ran in this call);
           * nothing runs and nothing waits: the stream closes.

           ``budget=0`` closes the stream at once, truncating everything.

        Args:
            requests: what joins the stream (none: just continue).
            budget: most tokens this call may generate (the caller passes what is left of its
                share of the step's budget).
            sampling: temperature and top-p of the requests added by this call; each
                request's own ``seed`` replaces ``sampling.seed``.
            expect_more: the caller has more requests to send when a slot frees.
        Returns:
            The events of this call in the order they happened (in a slot, the result of its
            request precedes the start that refilled it), the tokens generated, the iterations
            run, and whether the stream closed.
        """
        raise TypeError(f"{type(self).__name__} does not implement continuous refill (stream)")

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

    def sleep(self, level: int = 2) -> None:
        """Colocation: free the accelerator for training (level 2 drops the weights too: the next
        sync reloads them). Default: no memory to free."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Undo :meth:`sleep` for ``tags`` ("weights", "kv_cache"; None = all)."""

    def memory_state(self) -> dict:
        """What sleeps (for the memory trace): ``asleep`` tags, and ``no_weights``: why the engine
        has no usable weights (a level-2 sleep dropped them, or it started from dummy weights), or
        None. Default: never asleep, always loaded."""
        return {"asleep": [], "no_weights": None}

    # Weights straight from the trainers (megatron_tppo.controller.weight_sync): a backend that
    # supports it joins the transfer groups its workers receive from and takes every sync there.

    def join_weight_transfer(self, plan: dict) -> list[dict]:
        """Join the transfer groups: ``plan`` maps each worker rank of this engine to its groups
        (``{"backend", "host", "port", "world_size", "timeout_s", "rank"}`` each, in arrival order)."""
        raise TypeError(f"{type(self).__name__} cannot receive weights from a transfer group")

    def receive_weights(self, version: int) -> dict:
        """Receive one sync from the joined groups; stamps ``version``. Returns stats."""
        raise TypeError(f"{type(self).__name__} cannot receive weights from a transfer group")

    def close_weight_transfer(self) -> None:
        """Leave the transfer groups."""

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

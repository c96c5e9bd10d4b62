"""Continuous generation with refill: what :meth:`RolloutEngine.stream` takes and returns.

One *stream* is one engine's share of a budget step (``rollout.refill=continuous``): the engine
keeps a fixed set of slots busy, starts the next queued request in a slot the moment its
response ends, and stops everything once the step's token budget is spent. The caller (the
driver, with the window pool) sends requests and receives events over several calls; the engine
decides nothing about *which* sample comes next, only *when* a queued one starts.

Keys and slots are the caller's integers (the window pool's sample uids and slot ids); the
engine only checks that keys are unique within a stream and that a slot runs one request at a
time. All token ids are plain python ints, log-probs python floats in nats (the behaviour
log-probs of PPO, as in :class:`~megatron_tppo.rollout.base.GenerationResult`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

StreamFinish = Literal["stop", "length", "truncated"]


@dataclass
class StreamRequest:
    """One response to continue in a stream."""

    key: int
    """Caller's id, unique within the stream (the window pool's sample uid)."""
    token_ids: list[int]
    """Prompt + response so far (resume from token ids, never from re-tokenized text)."""
    max_tokens: int
    """>= 1: reaching it ends the request with finish "length" (the response's room before
    max_response_tokens, so "length" means forced finished)."""
    seed: Optional[int] = None
    """Sampling seed of this request (None: the engine's generator)."""
    slot: Optional[int] = None
    """Start at once in this slot; None: queue until a slot frees."""


@dataclass
class StreamResult:
    """A request that left the stream, with everything it generated since it started there."""

    key: int
    slot: int
    token_ids: list[int]
    """New tokens only; ends with the stop token when finish_reason is "stop"."""
    logprobs: list[float]
    """Log-prob of each new token under the distribution it was sampled from, [len(token_ids)]."""
    finish_reason: StreamFinish
    """"stop": a stop token ended it; "length": its max_tokens ran out; "truncated": the
    stream's budget ran out first (continue it from ``token_ids + result.token_ids``)."""
    policy_version: int


@dataclass
class StreamStart:
    """A queued request started in ``slot`` (whose previous request had just ended)."""

    key: int
    slot: int


@dataclass
class StreamUpdate:
    """What one :meth:`RolloutEngine.stream` call did."""

    events: list[Union[StreamResult, StreamStart]] = field(default_factory=list)
    """In the order they happened; in each slot a result precedes the start that refilled it."""
    tokens: int = 0
    """Tokens generated in this call (all requests)."""
    iterations: int = 0
    """Engine iterations (batched decode/prefill steps) run in this call."""
    closed: bool = False
    """The stream ended (budget spent, or nothing left to run); the next call opens a new one."""
    unstarted: list[int] = field(default_factory=list)
    """Keys of queued requests that never started (only when closed): still the caller's."""

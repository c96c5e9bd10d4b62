"""The driver's side of continuous refill (``rollout.refill=continuous``, TPPO.md section 7).

One :class:`ContinuousStep` is one budget step of the window pool spread over the rollout
engines; it speaks the :meth:`~megatron_tppo.rollout.base.RolloutEngine.stream` protocol with
each engine and applies what the engines report to the pool. The pool decides what comes next
(its FIFO of pending samples, :meth:`WindowPool.upcoming`); an engine only decides when: the
moment one of its slots frees, it starts the next sample it was handed.

Several engines: engine ``e`` owns a contiguous share of the slots and the same share of the
step's budget (``len(slots) * window_tokens`` each, summing to ``num_slots * window_tokens``), so
no engine can use another's budget and the step's budget holds whatever the engines' speeds.
Each engine is handed up to ``reserve`` upcoming samples ahead of need (default: as many as it
has slots), disjoint across engines; it returns to the driver for more only when a slot frees
with its queue empty, so most refills need no round trip. Samples handed out but never started
come back (``StreamUpdate.unstarted``) and stay pending in the pool, in their place.

With one engine everything is deterministic. With several, which engine takes which sample
depends on the order their replies arrive in; the pool's invariants (no sample lost or
duplicated, segments tiling responses, the budget) hold in any order.

Pure python (no ray, no vllm): :meth:`RolloutGroup.stream_step
<megatron_tppo.controller.groups.RolloutGroup.stream_step>` drives it over Ray actors,
:func:`run_in_process` over engines in this process (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_tppo.algorithms.window_pool import WindowPool
from megatron_tppo.rollout.base import RolloutEngine, Sampling
from megatron_tppo.rollout.stream import StreamRequest, StreamResult, StreamStart, StreamUpdate


@dataclass
class StreamCall:
    """The arguments of one ``RolloutEngine.stream`` call."""

    requests: list[StreamRequest]
    budget: int
    sampling: Sampling
    expect_more: bool

    def args(self) -> tuple:
        return self.requests, self.budget, self.sampling, self.expect_more


def slot_shares(num_slots: int, num_engines: int) -> list[range]:
    """Contiguous, near-equal slot ranges, one per engine (an engine may get none)."""
    return [range(e * num_slots // num_engines, (e + 1) * num_slots // num_engines) for e in range(num_engines)]


class ContinuousStep:
    """One budget step of ``pool`` over ``num_engines`` engines; see the module docstring.

    Creating it begins the pool's budget step and refills every free slot. Then: send
    :meth:`first_calls` to the engines; feed each reply to :meth:`on_update`, which returns that
    engine's next call or None once its stream closed. When every engine is done, the caller
    ends the step with ``pool.end_step()``; :meth:`stats` has the step's numbers.

    Args:
        pool: the window pool (at a step boundary).
        num_engines: engines sharing the step.
        sampling: temperature/top-p; a request's seed is ``sampling.seed + sample uid``.
        reserve: upcoming samples handed to an engine ahead of need (default: its slot count).
    """

    def __init__(self, pool: WindowPool, num_engines: int, sampling: Sampling, reserve: Optional[int] = None):
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.pool, self.sampling = pool, sampling
        self.budget = pool.begin_budget_step()
        pool.refill()
        self.slots = slot_shares(pool.num_slots, num_engines)
        self.left = [len(s) * pool.window_tokens for s in self.slots]
        self.reserve = [len(s) if reserve is None else reserve for s in self.slots]
        self.reserved: list[set[int]] = [set() for _ in self.slots]
        self.tokens = [0] * num_engines
        self.iterations = [0] * num_engines
        self.calls = [0] * num_engines
        self.done = [False] * num_engines

    # ------------------------------------------------------------------ protocol
    def first_calls(self) -> list[Optional[StreamCall]]:
        """Engine e's first call (its in-flight samples in their slots + its reserve); None for an
        engine with nothing to do this step."""
        out = []
        for e, slots in enumerate(self.slots):
            flying = self.pool.in_flight()
            reqs = [self._request(flying[slot], slot) for slot in slots if slot in flying]
            if not reqs:  # no sample in any of its slots: the stream ran dry, nothing to refill either
                self.done[e] = True
                out.append(None)
                continue
            out.append(self._call(e, reqs))
        return out

    def on_update(self, engine: int, update: StreamUpdate) -> Optional[StreamCall]:
        """Apply engine ``engine``'s reply to the pool; its next call, or None once it closed."""
        e = engine
        self.calls[e] += 1
        for ev in update.events:
            if isinstance(ev, StreamStart):
                if ev.key not in self.reserved[e] or ev.slot not in self.slots[e]:
                    raise RuntimeError(f"engine {e} started sample {ev.key} in slot {ev.slot}, which it was not given")
                self.reserved[e].discard(ev.key)
                self.pool.start(ev.slot, ev.key)
            elif isinstance(ev, StreamResult):
                self._apply(e, ev)
            else:
                raise TypeError(f"unknown stream event {ev!r}")
        self.tokens[e] += update.tokens
        self.iterations[e] += update.iterations
        self.left[e] -= update.tokens
        if self.left[e] < 0:
            raise RuntimeError(f"engine {e} generated {-self.left[e]} tokens beyond its budget share")
        for key in update.unstarted:
            self.reserved[e].discard(key)  # still pending in the pool, in its place
        if update.closed:
            if self.reserved[e]:
                raise RuntimeError(f"engine {e} closed its stream without returning samples {sorted(self.reserved[e])}")
            self.done[e] = True
            return None
        return self._call(e, [])

    def _apply(self, e: int, ev: StreamResult) -> None:
        held = self.pool.in_flight().get(ev.slot)
        if held is None or held.uid != ev.key or ev.slot not in self.slots[e]:
            raise RuntimeError(f"engine {e} reported sample {ev.key} in slot {ev.slot}, which holds "
                               f"{None if held is None else held.uid}")
        done = self.pool.append(ev.slot, ev.token_ids, ev.logprobs, ev.policy_version, eos=ev.finish_reason == "stop")
        if ev.finish_reason in ("stop", "length") and done is None:
            raise RuntimeError(
                f"sample {ev.key} ended ({ev.finish_reason}) after {len(held.response_ids)} of "
                f"max_response_tokens={self.pool.max_response_tokens} tokens without a stop token: the engine's "
                f"context (max_model_len) is shorter than prompt + max_response_tokens")

    # ------------------------------------------------------------------ requests
    def _request(self, s, slot: Optional[int]) -> StreamRequest:
        seed = None if self.sampling.seed is None else self.sampling.seed + s.uid
        return StreamRequest(s.uid, s.prompt_ids + s.response_ids, self.pool.max_response_tokens - len(s.response_ids),
                             seed, slot)

    def _call(self, e: int, requests: list[StreamRequest]) -> StreamCall:
        handed = set().union(*self.reserved)
        new = self.pool.upcoming(self.reserve[e] - len(self.reserved[e]), skip=handed)
        self.reserved[e].update(s.uid for s in new)
        handed.update(s.uid for s in new)
        requests = requests + [self._request(s, None) for s in new]
        more = not self.pool.exhausted or any(s.uid not in handed for s in self.pool.pending())
        return StreamCall(requests, self.left[e], self.sampling, more)

    # ------------------------------------------------------------------ numbers
    def stats(self) -> dict:
        """The step's tokens, budget and slot utilization.

        ``utilization`` = generated tokens / sum over engines of (its slots x its iterations):
        the fraction of slot-iterations that produced a token (1.0: no slot ever idled).
        ``budget_fill`` = generated tokens / the step's budget (below 1 only when the prompt
        stream ran dry).
        """
        tokens = sum(self.tokens)
        slot_iters = sum(len(s) * it for s, it in zip(self.slots, self.iterations))
        return {"tokens": tokens, "budget": self.budget, "iterations": max(self.iterations),
                "round_trips": sum(self.calls), "utilization": tokens / max(slot_iters, 1),
                "budget_fill": tokens / self.budget}

    def close_calls(self) -> list[int]:
        """Engines whose stream may still be open (to close with a ``budget=0`` call after an error)."""
        return [e for e, d in enumerate(self.done) if not d]


def close_quietly(engine: RolloutEngine) -> None:
    """Close a stream left open by an error (``stream([], 0)``); errors of the close are ignored."""
    try:
        engine.stream([], 0)
    except Exception:  # noqa: BLE001 - best effort on an error path
        pass


def run_in_process(step: ContinuousStep, engines: Sequence[RolloutEngine]) -> dict:
    """Drive ``step`` over engines living in this process, one call at a time in engine order.

    (Engines in Ray actors: ``RolloutGroup.stream_step``.) Returns ``step.stats()``; the caller
    ends the pool's step.
    """
    calls = dict(enumerate(step.first_calls()))
    calls = {e: c for e, c in calls.items() if c is not None}
    try:
        while calls:
            for e in sorted(calls):
                nxt = step.on_update(e, engines[e].stream(*calls[e].args()))
                if nxt is None:
                    del calls[e]
                else:
                    calls[e] = nxt
    except BaseException:
        for e in step.close_calls():
            close_quietly(engines[e])
        raise
    return step.stats()

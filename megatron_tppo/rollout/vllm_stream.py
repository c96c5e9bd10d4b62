"""vLLM's engine loop driven for continuous refill: the session behind ``VLLMEngine.stream``.

The protocol is :meth:`megatron_tppo.rollout.base.RolloutEngine.stream` (types in
:mod:`megatron_tppo.rollout.stream`). This module drives vLLM's ``LLMEngine`` (vllm 0.32,
``vllm/v1/engine/llm_engine.py``) directly instead of ``LLM.generate``, which runs the engine
until every request has finished:

* ``add_request(request_id, engine_input, SamplingParams)`` queues a request in the scheduler;
  it is admitted at the next ``step()`` (prefill plus its first token), alongside the decoding
  requests, so a slot refilled between two steps loses no iteration.
* ``step()`` runs one iteration of vLLM's continuous batching and returns a ``RequestOutput`` for
  every request that advanced. Requests are added with ``output_kind=RequestOutputKind.DELTA``
  (``vllm/sampling_params.py``): each output then carries only that step's new tokens and their
  log-probs (``OutputProcessor`` / ``RequestState._new_completion_output`` in
  ``vllm/v1/engine/output_processor.py``), and this session accumulates them.
* ``abort_request([request_id])`` removes a request from the scheduler and frees its KV blocks.
  An ``LLMEngine`` (no output queues) emits no final output for an aborted request, which is why
  the tokens are accumulated as they arrive: a truncated request's partial tokens and their
  log-probs are already here when it is aborted.
* Prompts are ``TokensPrompt``s rendered by the engine's renderer (``render_cmpl``, as
  ``LLM.generate`` does) rather than the deprecated raw-prompt path of ``InputProcessor``.
* Request ids are ``tppo-stream-<n>``; ``LLM.generate`` uses its own counter ("0", "1", ...).

``scheduler_config.stream_interval`` must be 1 (vLLM's default): with a larger interval DELTA
outputs are held back, and tokens of a request aborted between two deliveries would be lost.
With async scheduling (vLLM's default on GPU; off on CPU) a step's tokens arrive one ``step()``
late and a refilled slot joins one iteration later; tokens delivered beyond the budget are cut
off, so the budget still holds.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from megatron_tppo.rollout.base import Sampling
from megatron_tppo.rollout.stream import StreamRequest, StreamResult, StreamStart, StreamUpdate
from megatron_tppo.rollout.vllm_common import sampled_logprobs

_IDS = itertools.count()


@dataclass
class _Running:
    key: int
    slot: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class VLLMStream:
    """One open stream on a vLLM ``LLMEngine``; see the module docstring.

    Args:
        engine: ``vllm.LLM(...).llm_engine`` (must have nothing else running while the stream is open).
        make_params: ``(sampling, max_tokens, seed) -> SamplingParams`` with per-token log-probs
            of the sampled token (``logprobs=0``) and the engine's stop tokens.
        policy_version: stamp of the weights every result of the stream carries.
    """

    def __init__(self, engine, make_params: Callable, policy_version: int):
        from vllm.sampling_params import RequestOutputKind

        interval = engine.vllm_config.scheduler_config.stream_interval
        if interval != 1:
            raise ValueError(f"continuous refill needs vLLM's stream_interval=1, the engine has {interval}")
        if engine.has_unfinished_requests():
            raise RuntimeError("the vLLM engine still has requests of another call; a stream needs it to itself")
        self._engine, self._make_params, self._delta = engine, make_params, RequestOutputKind.DELTA
        self.policy_version = policy_version
        self._running: dict[str, _Running] = {}
        self._busy: dict[int, str] = {}  # slot -> request id
        self._free: list[int] = []  # slots whose request ended, in the order they ended
        self._queue: deque[StreamRequest] = deque()
        self._keys: set[int] = set()
        self.closed = False

    # ------------------------------------------------------------------ the protocol
    def run(self, requests: Sequence[StreamRequest], budget: int, sampling: Sampling,
            expect_more: bool) -> StreamUpdate:
        if self.closed:
            raise RuntimeError("this stream is closed")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        upd = StreamUpdate()
        for r in requests:
            self._admit(r, sampling, upd)
        self._refill(sampling, upd)
        while True:
            left = budget - upd.tokens
            if left <= 0 or not (self._running or self._queue):
                self._close(upd)
                return upd
            if not self._running:
                raise ValueError(f"{len(self._queue)} queued requests but no slot to run them in "
                                 f"(give at least one request a slot)")
            if len(self._running) > left:  # one more iteration could overshoot: truncate the excess now
                for rid in sorted(self._running, key=lambda i: -self._running[i].slot)[:len(self._running) - left]:
                    self._stop(rid, "truncated", upd, abort=True, free=False)
            self._iterate(budget, upd)
            self._refill(sampling, upd)
            if self._free and not self._queue and expect_more and upd.tokens < budget:
                return upd  # a slot is idle: the caller sends the next requests

    # ------------------------------------------------------------------ pieces
    def _admit(self, r: StreamRequest, sampling: Sampling, upd: StreamUpdate) -> None:
        if r.key in self._keys:
            raise ValueError(f"key {r.key} is already in this stream")
        if r.max_tokens < 1:
            raise ValueError(f"key {r.key}: max_tokens must be >= 1, got {r.max_tokens}")
        if not r.token_ids:
            raise ValueError(f"key {r.key}: no token ids")
        if r.slot is not None and r.slot in self._busy:
            raise ValueError(f"key {r.key}: slot {r.slot} is busy with another request")
        self._keys.add(r.key)
        if r.slot is None:
            self._queue.append(r)
            return
        if r.slot in self._free:
            self._free.remove(r.slot)
        self._start(r, r.slot, sampling)

    def _start(self, r: StreamRequest, slot: int, sampling: Sampling) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        params = self._make_params(sampling, int(r.max_tokens), r.seed)
        params.output_kind = self._delta
        prompt = parse_model_prompt(self._engine.model_config, TokensPrompt(prompt_token_ids=[int(t) for t in r.token_ids]))
        (engine_input,) = self._engine.renderer.render_cmpl([prompt])
        rid = f"tppo-stream-{next(_IDS)}"
        self._engine.add_request(rid, engine_input, params)
        self._running[rid] = _Running(r.key, slot)
        self._busy[slot] = rid

    def _refill(self, sampling: Sampling, upd: StreamUpdate) -> None:
        while self._free and self._queue:
            slot, r = self._free.pop(0), self._queue.popleft()
            self._start(r, slot, sampling)
            upd.events.append(StreamStart(r.key, slot))

    def _iterate(self, budget: int, upd: StreamUpdate) -> None:
        """One engine step; new tokens are appended to their requests, ended requests reported."""
        outputs = self._engine.step()
        upd.iterations += 1
        for out in outputs:
            run = self._running.get(out.request_id)
            if run is None:
                continue  # an output of a request truncated just before (async scheduling)
            comp = out.outputs[0]
            ids = [int(t) for t in comp.token_ids]
            lps = sampled_logprobs(ids, comp.logprobs) if ids else []
            room = budget - upd.tokens
            cut = len(ids) > room  # only when a step delivers several tokens per request
            if cut:
                ids, lps = ids[:room], lps[:room]
            run.token_ids += ids
            run.logprobs += lps
            upd.tokens += len(ids)
            if cut:
                self._stop(out.request_id, "truncated", upd, abort=not out.finished, free=False)
            elif out.finished:
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM ended request {out.request_id} with {comp.finish_reason!r}")
                self._stop(out.request_id, comp.finish_reason, upd, abort=False, free=True)

    def _stop(self, rid: str, reason: str, upd: StreamUpdate, abort: bool, free: bool) -> None:
        run = self._running.pop(rid)
        del self._busy[run.slot]
        if abort:
            self._engine.abort_request([rid])
        if free:
            self._free.append(run.slot)
        upd.events.append(StreamResult(run.key, run.slot, run.token_ids, run.logprobs, reason, self.policy_version))

    def abandon(self) -> None:
        """After an error: abort whatever this stream started, so the engine is empty again."""
        if self._running:
            self._engine.abort_request(list(self._running))
        self._running.clear()
        self._busy.clear()
        self._queue.clear()
        self._free.clear()
        self.closed = True

    def _close(self, upd: StreamUpdate) -> None:
        """Truncate whatever runs (by slot), hand back the queue, leave the engine empty."""
        if self._running:
            self._engine.abort_request(list(self._running))
        for rid in sorted(self._running, key=lambda i: self._running[i].slot):
            run = self._running[rid]
            upd.events.append(StreamResult(run.key, run.slot, run.token_ids, run.logprobs, "truncated",
                                           self.policy_version))
        upd.unstarted = [r.key for r in self._queue]
        self._running.clear()
        self._busy.clear()
        self._queue.clear()
        self._free.clear()
        upd.closed = self.closed = True

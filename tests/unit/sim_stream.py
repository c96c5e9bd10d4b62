"""A simulated continuous-refill engine: the RolloutEngine.stream protocol without a model.

For the pure tests of the window pool and of controller/continuous.py (the real protocol runs on
vLLM in tests/rollout/test_vllm_stream.py). Tokens, log-probs and where a response ends come from
a deterministic generator (``gen.token(uid, pos)``, ``gen.logprob(uid, pos)``,
``gen.natural_len(uid)``); a seeded ``hiccup`` probability lets a request skip an iteration (as a
request waiting for its prefill does), so slots progress unevenly.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Callable, Sequence

from megatron_tppo.rollout.base import RolloutEngine, Sampling
from megatron_tppo.rollout.stream import StreamRequest, StreamResult, StreamStart, StreamUpdate


class SimStreamEngine(RolloutEngine):
    def __init__(self, gen, prompt_len: Callable[[int], int], seed: int = 0, hiccup: float = 0.0, version: int = 0):
        self.gen, self.prompt_len, self.hiccup = gen, prompt_len, hiccup
        self.rng = random.Random(seed)
        self.policy_version = version
        self.open = False
        self.iterations = 0

    def generate(self, *a, **k):  # not used by these tests
        raise NotImplementedError

    def load_weights(self, weights, version):
        self.policy_version = version

    def _new_stream(self):
        self.running, self.queue, self.free, self.keys = {}, deque(), [], set()
        self.open = True

    def stream(self, requests: Sequence[StreamRequest], budget: int, sampling: Sampling = Sampling(),
               expect_more: bool = True) -> StreamUpdate:
        if not self.open:
            self._new_stream()
        upd = StreamUpdate()
        for r in requests:
            assert r.key not in self.keys and r.max_tokens >= 1 and r.token_ids
            self.keys.add(r.key)
            if r.slot is None:
                self.queue.append(r)
            else:
                assert r.slot not in self.running
                if r.slot in self.free:
                    self.free.remove(r.slot)
                self.running[r.slot] = [r, [], []]
        self._refill(upd)
        while True:
            left = budget - upd.tokens
            if left <= 0 or not (self.running or self.queue):
                self._close(upd)
                return upd
            assert self.running, "queued requests but no slot"
            if len(self.running) > left:
                for slot in sorted(self.running, reverse=True)[:len(self.running) - left]:
                    r, ids, lps = self.running.pop(slot)
                    upd.events.append(StreamResult(r.key, slot, ids, lps, "truncated", self.policy_version))
            upd.iterations += 1
            self.iterations += 1
            for slot in sorted(self.running):
                if self.rng.random() < self.hiccup:
                    continue
                r, ids, lps = self.running[slot]
                have = len(r.token_ids) - self.prompt_len(r.key) + len(ids)
                ids.append(self.gen.token(r.key, have))
                lps.append(self.gen.logprob(r.key, have))
                upd.tokens += 1
                if have + 1 == self.gen.natural_len(r.key) or len(ids) == r.max_tokens:
                    reason = "stop" if have + 1 == self.gen.natural_len(r.key) else "length"
                    del self.running[slot]
                    self.free.append(slot)
                    upd.events.append(StreamResult(r.key, slot, ids, lps, reason, self.policy_version))
            self._refill(upd)
            if self.free and not self.queue and expect_more and upd.tokens < budget:
                return upd

    def _refill(self, upd):
        while self.free and self.queue:
            slot, r = self.free.pop(0), self.queue.popleft()
            self.running[slot] = [r, [], []]
            upd.events.append(StreamStart(r.key, slot))

    def _close(self, upd):
        for slot in sorted(self.running):
            r, ids, lps = self.running[slot]
            upd.events.append(StreamResult(r.key, slot, ids, lps, "truncated", self.policy_version))
        upd.unstarted = [r.key for r in self.queue]
        upd.closed = True
        self.open = False

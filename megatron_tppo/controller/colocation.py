"""Who holds the GPUs in each phase of a colocated step (``rollout.colocate``).

Policy, critic and vLLM engines share the same GPUs (:mod:`megatron_tppo.placement`), so a step
hands the memory over three times, in the order vLLM needs (its ``sleep(level)`` /
``wake_up(tags)``: weights can wake without the KV cache, so the sync writes into live weights
before the cache takes the rest of the memory; verl's hybrid engine and NeMo-RL's colocated
refit do the same):

1. generation: engines hold weights and KV cache; the trainers' parameters, gradients and
   optimizer states are off the GPU;
2. :meth:`for_training`: engines sleep; the trainers come back (critic values, both updates);
3. :meth:`for_sync`: the critic and the policy's gradients and optimizer states go off the GPU;
   engines wake their weights only; then the policy's weights stream into them;
4. :meth:`for_generation`: the policy's parameters go off the GPU; engines wake their KV cache.

Not colocated, every call is a no-op (each component keeps its own GPUs). On CPU vLLM's sleep and
wake do nothing, while the trainers' offload really frees and restores their storages, so the same
sequence runs everywhere. :attr:`trace` records the phases, for the logs and the tests.
"""
from __future__ import annotations

import time


class Colocation:
    def __init__(self, enabled: bool, policy, critic, rollout):
        self.enabled, self.policy, self.critic, self.rollout = enabled, policy, critic, rollout
        self.phase = "generation" if not enabled else "start"
        self.trace: list[str] = []
        self.seconds = 0.0
        """Time spent handing memory over since the last :meth:`take_seconds`."""

    def _enter(self, phase: str, *calls) -> None:
        if not self.enabled or self.phase == phase:
            return
        t0 = time.perf_counter()
        for call in calls:
            call()
        self.seconds += time.perf_counter() - t0
        self.phase = phase
        self.trace.append(phase)

    def for_training(self, keep_weights: bool = False) -> None:
        """Engines sleep: level 2 (weights dropped too) when a sync will refill them this step,
        level 1 (weights kept in host memory) when none will (critic warm-up)."""
        level = 1 if keep_weights else 2
        self._enter("training", lambda: self.rollout.sleep(level), self.policy.onload, self.critic.onload)

    def for_sync(self) -> None:
        self._enter("sync", self.critic.offload, lambda: self.policy.offload(params=False),
                    lambda: self.rollout.wake_up(["weights"]))

    def for_generation(self) -> None:
        if self.phase in ("start", "training"):  # a step without a sync (critic warm-up)
            self.for_sync()
        self._enter("generation", self.policy.offload, lambda: self.rollout.wake_up(["kv_cache"]))

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

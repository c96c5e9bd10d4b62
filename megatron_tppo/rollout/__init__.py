"""Rollout: the generation interface and its backends, chosen by name and imported lazily.

Importing this package imports no backend: ``create_engine("vllm", ...)`` imports vLLM only then
(it takes seconds and sets process-wide environment variables).
"""
from __future__ import annotations

import importlib

from megatron_tppo.rollout.base import GenerationResult, RolloutEngine, Sampling, normalize_max_tokens

# backend name -> "module:class" (imported on first use)
BACKENDS = {
    "vllm": "megatron_tppo.rollout.vllm_backend:VLLMEngine",
}


def engine_class(backend: str) -> type[RolloutEngine]:
    """Import and return the engine class registered under ``backend``."""
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown rollout backend {backend!r}; known: {sorted(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def create_engine(backend: str, *args, **kwargs) -> RolloutEngine:
    """Build the engine registered under ``backend`` (its constructor takes the arguments)."""
    return engine_class(backend)(*args, **kwargs)


__all__ = ["BACKENDS", "GenerationResult", "RolloutEngine", "Sampling", "create_engine", "engine_class",
           "normalize_max_tokens"]

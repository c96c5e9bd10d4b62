"""Reward functions ``(response_text, meta) -> float`` (1.0 correct, 0.0 otherwise), pure, plus
:class:`SafeReward`, which runs one with a timeout and counts errors/timeouts.

Registry: ``"arith"`` (the synthetic task's final ``#<int>``), ``"math"`` (``\\boxed{}`` answers
checked with math_verify). A user reward is named by its import path, ``"package.module:function"``
(a module-level function, so the reward worker process can import it too).
:func:`make_safe_reward` builds the wrapped function from a name.
"""
from __future__ import annotations

from megatron_tppo.rewards.arith import arith_reward
from megatron_tppo.rewards.math import math_reward
from megatron_tppo.rewards.safe import RewardResult, SafeReward

REWARDS = {"arith": arith_reward, "math": math_reward}
_PRELOAD = {"math": ("math_verify",)}  # heavy imports done when the worker starts, not per call


def get_reward(name: str):
    """The reward function registered under ``name``, or imported from ``"module:function"``."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward {name!r} cannot be imported: {type(err).__name__}: {err}") from None
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}, "
                         "or 'module:function'") from None


def make_safe_reward(name: str, timeout_s: float = 5.0, mode: str = "process") -> SafeReward:
    """``SafeReward`` around the registered reward ``name``."""
    return SafeReward(get_reward(name), timeout_s, mode, preload=_PRELOAD.get(name, ()))


__all__ = ["REWARDS", "RewardResult", "SafeReward", "arith_reward", "get_reward", "make_safe_reward", "math_reward"]

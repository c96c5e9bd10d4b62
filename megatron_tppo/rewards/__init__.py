"""Reward functions ``(response_text, meta) -> float`` (1.0 correct, 0.0 otherwise), pure, plus
:class:`SafeReward`, which runs one with a timeout and counts errors/timeouts.

Registry: ``"arith"`` (the synthetic task's final ``#<int>``), ``"math"`` (``\\boxed{}`` answers
checked with math_verify). :func:`make_safe_reward` builds the wrapped function from a name.
"""
from __future__ import annotations

from megatron_tppo.rewards.arith import arith_reward
from megatron_tppo.rewards.math import math_reward
from megatron_tppo.rewards.safe import RewardResult, SafeReward

REWARDS = {"arith": arith_reward, "math": math_reward}
_PRELOAD = {"math": ("math_verify",)}  # heavy imports done when the worker starts, not per call


def get_reward(name: str):
    """The reward function registered under ``name``."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}") from None


def make_safe_reward(name: str, timeout_s: float = 5.0, mode: str = "process") -> SafeReward:
    """``SafeReward`` around the registered reward ``name``."""
    return SafeReward(get_reward(name), timeout_s, mode, preload=_PRELOAD.get(name, ()))


__all__ = ["REWARDS", "RewardResult", "SafeReward", "arith_reward", "get_reward", "make_safe_reward", "math_reward"]

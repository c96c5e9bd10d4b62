"""Reward of the synthetic arithmetic task: 1.0 iff the last ``#<int>`` equals the answer."""
from __future__ import annotations

from megatron_tppo.data.arith import parse_answer


def arith_reward(response_text: str, meta: dict) -> float:
    """``meta["answer"]``: the reference int. Only the final answer counts, not the steps, so the
    reward is exactly what the task asks; the last ``#`` wins (a response cannot list guesses and
    hope: only its last one is read)."""
    got = parse_answer(response_text)
    return 1.0 if got is not None and got == int(meta["answer"]) else 0.0

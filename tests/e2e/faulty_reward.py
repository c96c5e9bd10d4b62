"""A reward for the fault tests that raises or hangs on some responses, chosen by a checksum of the
text so the test can tell afterwards which ones should have failed."""
import time
import zlib

from megatron_tppo.rewards.arith import arith_reward


def outcome(text: str) -> str:
    """"raise", "hang" or "ok" for this response text."""
    c = zlib.crc32(text.encode())
    return "raise" if c % 4 == 0 else "hang" if c % 4 == 1 else "ok"


def reward(text: str, meta: dict) -> float:
    kind = outcome(text)
    if kind == "raise":
        raise ValueError("the reward model choked on this response")
    if kind == "hang":
        time.sleep(3600)
    return arith_reward(text, meta)

"""Reward for math answers in ``\\boxed{...}`` (DAPO-Math / AIME style): 1.0 iff equivalent.

The response must contain a ``\\boxed{}`` (the last one is the answer; a response without one
scores 0, as in DAPO). Equivalence is decided by ``math_verify`` (parse both, ``verify``: 0.5 ==
\\frac{1}{2}, 1+x^2 == x^2+1, ...), and a normalized string comparison catches what it cannot
parse. math_verify's own timeouts are signal-based and work only in a main thread, so they are
switched off here (``parsing_timeout=None``, ``timeout_seconds=None``): run this function through
:class:`megatron_tppo.rewards.safe.SafeReward`, which enforces the timeout from outside.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched), or None."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):  # an unclosed last box falls back to the one before
        depth, i = 1, start
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
            i += 1
    return None


def normalize(ans: str) -> str:
    """Loose canonical form of an answer string: the fallback when math_verify cannot decide."""
    s = str(ans).strip().strip("$").strip()
    s = _TEXT_RE.sub(r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                 ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", ""),
                 ("\\%", ""), ("%", ""), ("\\$", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # "x=5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):  # 5.0 / 5.50 -> 5 / 5.5
        s = s.rstrip("0").rstrip(".")
    return s


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is disabled" notices
    g = parse(f"${gold}$", parsing_timeout=None)
    p = parse(f"$\\boxed{{{pred}}}$", parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


def math_reward(response_text: str, meta: dict) -> float:
    """``meta["answer"]``: the reference answer (string or number, with or without ``\\boxed``)."""
    pred = last_boxed(response_text)
    if pred is None or not pred:
        return 0.0
    gold = str(meta["answer"]).strip()
    gold = last_boxed(gold) or gold
    if normalize(gold) == normalize(pred):
        return 1.0
    try:
        return 1.0 if _verify(gold, pred) else 0.0
    except Exception:  # math_verify/sympy failures fall back to the string comparison above
        return 0.0

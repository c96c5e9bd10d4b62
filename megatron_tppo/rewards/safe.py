"""Run a reward function so that it can neither crash nor stall the training loop.

A reward that raises scores 0 with status ``"error"``; one that runs past ``timeout_s`` scores 0
with status ``"timeout"``; anything that is not a finite number counts as an error. Calls and
outcomes are counted (:attr:`SafeReward.counts`) so the caller can log them.

Two ways to enforce the timeout:

``mode="process"`` (default)
    The function runs in a worker process (``spawn``: safe beside Ray/torch threads). A call that
    overruns is abandoned by killing that worker (only the worker this object started); the next
    call starts a fresh one. A hung sympy simplification therefore costs nothing afterwards. The
    function must be picklable (a module-level function, as the registry's are); the worker start
    (~1 s) is paid once.
``mode="thread"``
    The call runs in a daemon thread joined with a timeout. Cheap and works with any callable,
    but an overrunning thread cannot be stopped: it keeps running in the background (counted in
    :attr:`SafeReward.leaked_threads`). Fine for fast, well-behaved rewards and for tests.

Signal-based timeouts (math_verify's default) work only in a main thread; the math reward turns
them off and relies on this wrapper instead.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

RewardFn = Callable[[str, dict], float]
STATUSES = ("ok", "error", "timeout")


@dataclass
class RewardResult:
    score: float
    """The reward; 0.0 unless status is "ok"."""
    status: str
    """"ok", "error" or "timeout"."""
    reason: str = ""
    """Why it is not ok (exception type and message), for the log."""


def _check(value) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward returned a non-finite value {value!r}")
    return score


def _worker(conn, fn: RewardFn, preload: tuple[str, ...]) -> None:
    """Worker process loop: import ``preload``, say ready, then receive ``(text, meta)`` and send
    ``(status, score_or_reason)``."""
    import importlib

    for name in preload:  # slow imports (math_verify: sympy) must not count against a call
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(("ok", _check(fn(*msg))))
        except BaseException as err:  # noqa: BLE001 - the worker must survive anything
            conn.send(("error", f"{type(err).__name__}: {err}"))


class SafeReward:
    """``SafeReward(fn, timeout_s)(text, meta) -> RewardResult``; see the module docstring."""

    def __init__(self, fn: RewardFn, timeout_s: float = 5.0, mode: str = "process",
                 preload: Sequence[str] = (), start_timeout_s: float = 120.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        self.fn, self.timeout_s, self.mode = fn, timeout_s, mode
        self.preload, self.start_timeout_s = tuple(preload), start_timeout_s
        self.counts: Counter = Counter({s: 0 for s in STATUSES})
        self.leaked_threads = 0
        self._proc: Optional[mp.process.BaseProcess] = None
        self._conn = None

    # ------------------------------------------------------------------------- one call
    def __call__(self, response_text: str, meta: dict) -> RewardResult:
        run = self._call_process if self.mode == "process" else self._call_thread
        res = run(response_text, meta)
        self.counts[res.status] += 1
        return res

    def _call_thread(self, text: str, meta: dict) -> RewardResult:
        box: dict = {}

        def target():
            try:
                box["score"] = _check(self.fn(text, meta))
            except BaseException as err:  # noqa: BLE001
                box["error"] = f"{type(err).__name__}: {err}"

        t = threading.Thread(target=target, name="reward", daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            self.leaked_threads += 1
            return RewardResult(0.0, "timeout", f"no result after {self.timeout_s:g} s")
        if "error" in box:
            return RewardResult(0.0, "error", box["error"])
        return RewardResult(box["score"], "ok")

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, self.fn, self.preload), name="reward-worker",
                                 daemon=True)
        self._proc.start()
        child.close()
        # Wait for the worker's imports outside any call's budget (a loaded machine may be slow).
        if not self._conn.poll(self.start_timeout_s):
            self._kill()
            raise RuntimeError(f"reward worker did not start within {self.start_timeout_s:g} s")
        self._conn.recv()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # our own worker, by its handle
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _call_process(self, text: str, meta: dict) -> RewardResult:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            try:
                self._start()
            except (RuntimeError, EOFError, OSError) as err:
                return RewardResult(0.0, "error", f"reward worker failed to start: {err}")
        deadline = time.monotonic() + self.timeout_s
        try:
            self._conn.send((text, meta))
            while not self._conn.poll(0.01):
                if time.monotonic() > deadline or not self._proc.is_alive():
                    break
            if self._conn.poll(0):
                status, value = self._conn.recv()
                return RewardResult(value, "ok") if status == "ok" else RewardResult(0.0, "error", value)
        except (EOFError, OSError, BrokenPipeError) as err:
            self._kill()
            return RewardResult(0.0, "error", f"reward worker died: {type(err).__name__}: {err}")
        if not self._proc.is_alive():
            code = self._proc.exitcode
            self._kill()
            return RewardResult(0.0, "error", f"reward worker exited with code {code}")
        self._kill()
        return RewardResult(0.0, "timeout", f"no result after {self.timeout_s:g} s")

    # ------------------------------------------------------------------------- batches
    def score_batch(self, texts: Sequence[str], metas: Sequence[dict]) -> tuple[list[float], dict]:
        """Scores of a batch and this batch's counts ``{"ok", "error", "timeout", "reasons"}``."""
        if len(texts) != len(metas):
            raise ValueError(f"{len(texts)} texts but {len(metas)} metas")
        counts: dict = {s: 0 for s in STATUSES}
        reasons: list[str] = []
        scores = []
        for text, meta in zip(texts, metas):
            res = self(text, meta)
            scores.append(res.score)
            counts[res.status] += 1
            if res.reason and len(reasons) < 5:
                reasons.append(f"{res.status}: {res.reason}")
        counts["reasons"] = reasons
        return scores, counts

    def close(self) -> None:
        """Stop the worker process (if any)."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(2)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    def __enter__(self) -> "SafeReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

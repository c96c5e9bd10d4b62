"""A quiet console: the progress bar, the step lines and real problems; everything else in files.

Where the output of a run goes (``<output_dir>/logs/``):

- ``driver.log``: everything the driver prints, stdout and stderr (progress-bar redraws left out).
  :func:`start_run_logs` sets this up in the entry point.
- ``worker-<host>-<pid>.log``: everything one Ray worker process writes, Python and C/C++ alike
  (megatron-core, vLLM, torch, NCCL/gloo): :func:`worker_process_setup`, Ray's
  ``worker_process_setup_hook`` (installed by :func:`megatron_tppo.controller.cluster.connect`),
  points the process's file descriptors 1 and 2 at that file before any actor starts. Child
  processes (vLLM's multiprocess workers) inherit it. ``actors.json`` in the run directory says
  which actor runs in which process.

From a worker, the console (Ray forwards it to the driver, prefixed with the pid) still gets, once
per process and message: Python warnings and log records of level WARNING and above (the root
logger, and vLLM's through ``VLLM_LOGGING_STREAM``), except the known-harmless ones of
:data:`KNOWN_HARMLESS`, each listed with the reason it is harmless. Deprecation and future
warnings go to the file only. Tracebacks of failed actor calls reach the driver through Ray as
exceptions, whatever the workers' output does.

This module is imported by every worker process (and by vLLM's child processes, through
``VLLM_LOGGING_STREAM``): it imports nothing heavy.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Optional, TextIO

LOG_DIR_ENV = "TPPO_LOG_DIR"
"""Environment variable naming the run's log directory for the worker processes."""

# (pattern searched in the message, why it is harmless here)
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    (r"Apex is not installed", "megatron-core falls back to torch norms; apex is not on PyPI (PLATFORM.md)"),
    (r"Transformer Engine and Apex are not installed",
     "megatron-core's CPU fallbacks for fused optimizer kernels; TE is the GPU extra"),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron-core's DistributedOptimizer.zero_grad reads .grad of its fp32 shard views (its own "
     "comment in distrib_optimizer.py says so); fp32 parameters only, the CPU default"),
    (r"The global random seed is set to", "vLLM in-process (CPU); sampling is seeded per request"),
    (r"does not officially support disabling chunked prefill",
     "chunked prefill is off on CPU on purpose (seeded large batches crashed with it)"),
    (r"Enforce eager set|Inductor compilation was disabled", "vLLM runs eagerly on CPU, as configured"),
    (r"Triton is not installed|Model Runner V2 requires Triton|Triton not available",
     "no triton on CPU; vLLM uses its V1 model runner"),
    (r"is not found in LD_PRELOAD", "vLLM's CPU performance hint (tcmalloc / Intel OpenMP)"),
    (r"doesn't allow to use `torch.set_num_threads`", "vLLM's CPU worker pins its threads and says so"),
    (r"Chat template warmup failed|Using None for EOS token id because tokenizer is not initialized",
     "the engine runs with skip_tokenizer_init (token ids in and out; stop tokens are passed explicitly)"),
    (r"Reset SSM cache type to float32",
     "vLLM's CPU platform sets the dtype of a mamba state cache; Qwen2/Llama have no SSM layers"),
    (r"RotaryEmbedding: Failed to load weights",
     "vLLM's weight reload finds no checkpoint tensor for the RoPE cos/sin cache (computed, not a "
     "weight) and keeps the one it has (reload/layerwise.py)"),
)
_HARMLESS = re.compile("|".join(f"(?:{p})" for p, _ in KNOWN_HARMLESS))
# vLLM's log line: "[prefix](<process> pid=<n>) LEVEL mm-dd hh:mm:ss [file.py:line] message"
_VLLM_PROBLEM = re.compile(r"\) (WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d (.*)")
_QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

_console: Optional[TextIO] = None  # this worker's way to the console (Ray forwards it to the driver)
_log_path: Optional[Path] = None
_shown: set[str] = set()


def is_harmless(text: str) -> bool:
    """True when ``text`` is one of :data:`KNOWN_HARMLESS`."""
    return _HARMLESS.search(text) is not None


def to_console(key: str, text: str) -> bool:
    """Write ``text`` to the console once per ``key`` in this process; False if nothing was written."""
    if _console is None or key in _shown:
        return False
    _shown.add(key)
    where = f" (all of it in {_log_path})" if _log_path is not None and len(_shown) == 1 else ""
    try:
        _console.write(text.rstrip("\n") + where + "\n")
        _console.flush()
    except (OSError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------- worker processes


def _showwarning(message, category, filename, lineno, file=None, line=None):
    _plain_showwarning(message, category, filename, lineno, file, line)  # -> stderr: the worker log
    if file is None and not issubclass(category, _QUIET_CATEGORIES) and not is_harmless(str(message)):
        to_console(f"{category.__name__}: {message}", f"{category.__name__}: {message} ({filename}:{lineno})")


_plain_showwarning = warnings.showwarning


class _ConsoleHandler(logging.Handler):
    """Root-logger records of WARNING and above, not known-harmless, to the console once each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if not is_harmless(msg):
                to_console(f"{record.name}:{msg}", f"{record.levelname} {record.name}: {msg}")
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _VllmLogStream:
    """The stream of vLLM's log handler in the workers (``VLLM_LOGGING_STREAM=ext://
    megatron_tppo.console.vllm_log_stream``): every record goes to this process's stdout (the
    worker log); WARNING and above that are not known-harmless also to the console, once each."""

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        first = text.split("\n", 1)[0]
        problem = _VLLM_PROBLEM.search(first)
        if problem and not is_harmless(text):
            to_console(problem.group(2), text)
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return False


vllm_log_stream = _VllmLogStream()


def worker_log_path(log_dir: str | Path) -> Path:
    """``<log_dir>/worker-<host>-<pid>.log`` of this process (host: pids repeat across nodes)."""
    return Path(log_dir) / f"worker-{socket.gethostname()}-{os.getpid()}.log"


def worker_process_setup() -> None:
    """Ray's ``worker_process_setup_hook``: send this worker's output to its log file (see the
    module docstring). Does nothing without ``TPPO_LOG_DIR``; never raises (a failing hook would
    stop the worker), it says on the console why it left the output alone instead."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir or _console is not None:
        return
    try:
        _redirect_to(worker_log_path(log_dir))
    except OSError as err:
        print(f"[tppo] worker {os.getpid()}: cannot write a log under {log_dir} ({err}); output stays on the console",
              file=sys.stderr, flush=True)


def quiet_process(log_path: str | Path) -> TextIO:
    """This process's output (Python and C/C++ alike: vLLM in-process, torch) into ``log_path``,
    the way a worker's goes to its log (warnings and problems still reach the console once each,
    see the module docstring). Returns a stream to the console, for what the user should see.
    For a single-process tool (``python -m megatron_tppo.evaluate``); raises OSError if the log
    cannot be written. Calling it again returns the same console stream."""
    if _console is None:
        _redirect_to(Path(log_path))
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://megatron_tppo.console.vllm_log_stream")
    return _console


def _redirect_to(path: Path) -> None:
    global _console, _log_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _console, _log_path = console, path
    warnings.showwarning = _showwarning
    root = logging.getLogger()
    file_handler = logging.StreamHandler(sys.stderr)  # what Python's last-resort handler would print
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console_handler = _ConsoleHandler(logging.WARNING)
    for h in (file_handler, console_handler):
        h.setLevel(logging.WARNING)
        root.addHandler(h)


# ----------------------------------------------------------------------------- the driver


class _Tee:
    """A text stream that writes to ``stream`` and appends to ``log`` (carriage-return redraws,
    the progress bar's, only to ``stream``)."""

    def __init__(self, stream: TextIO, log: TextIO):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        if text and not text.startswith("\r"):
            try:
                self._log.write(text)
                self._log.flush()
            except (OSError, ValueError):
                pass
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the console stream
        return getattr(self._stream, name)


class _FileOnly(logging.Filter):
    """Keeps a known notice off the console: into driver.log only."""

    def __init__(self, pattern: str, log: TextIO):
        super().__init__()
        self.pattern, self.log = re.compile(pattern), log

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not self.pattern.search(msg):
            return True
        try:
            self.log.write(f"{record.levelname} {record.name}: {msg}\n")
            self.log.flush()
        except (OSError, ValueError):
            pass
        return False


# Ray's notice, when it starts a local cluster, that it turned token authentication on by default
# (it stays on: this only keeps the notice off the console)
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_NOTICE = r"^Token authentication is enabled for this Ray cluster"


def start_run_logs(output_dir: str | Path) -> Path:
    """In the driver: copy its stdout and stderr into ``<output_dir>/logs/driver.log`` and name the
    log directory for the worker processes (``TPPO_LOG_DIR``). Returns the log directory."""
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "driver.log", "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - lives with the process
    if not isinstance(sys.stdout, _Tee):
        sys.stdout = _Tee(sys.stdout, log)
    if not isinstance(sys.stderr, _Tee):
        sys.stderr = _Tee(sys.stderr, log)
    logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_FileOnly(_RAY_AUTH_NOTICE, log))
    os.environ[LOG_DIR_ENV] = str(log_dir.resolve())
    return log_dir

"""The quiet console's parts without Ray: a worker process's output all goes to its log file, and
only real problems, once each, to the console (the process's original stderr); the driver's
output is copied into driver.log."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from megatron_tppo import console

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import logging, os, sys, warnings
    from megatron_tppo import console
    console.worker_process_setup()
    print("plain print from the worker")
    os.write(2, b"C-level write to fd 2\\n")
    warnings.warn("Apex is not installed. Falling back to Torch Norm")
    warnings.warn("something is really off", RuntimeWarning)
    warnings.warn("something is really off", RuntimeWarning)
    warnings.warn("old api", DeprecationWarning)
    warnings.warn("future api", FutureWarning)
    s = console.vllm_log_stream
    s.write("(MainProcess pid=1) WARNING 12-01 09:58:08 [cpu.py:224] Triton is not installed. triton-cpu is expected\\n")
    s.write("(MainProcess pid=1) INFO 12-01 09:58:08 [core.py:1] engine started\\n")
    s.write("(MainProcess pid=1) WARNING 12-01 09:58:09 [sched.py:9] KV cache is too small\\n")
    s.write("(MainProcess pid=1) WARNING 12-01 09:58:10 [sched.py:9] KV cache is too small\\n")
    logging.getLogger("megatron.core.x").warning("a megatron warning")
    logging.getLogger("megatron.core.x").info("an info line")
""")


def _run_worker(tmp_path: Path, log_dir: Path | None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    env.pop(console.LOG_DIR_ENV, None)
    if log_dir is not None:
        env[console.LOG_DIR_ENV] = str(log_dir)
    return subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=60)


def test_worker_output_goes_to_its_log_and_only_problems_to_the_console(tmp_path):
    proc = _run_worker(tmp_path, tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr
    logs = list((tmp_path / "logs").glob("worker-*.log"))
    assert len(logs) == 1 and logs[0].name.startswith("worker-") and logs[0].suffix == ".log"
    text = logs[0].read_text()
    for line in ("plain print from the worker", "C-level write to fd 2", "Apex is not installed",
                 "something is really off", "future api", "Triton is not installed", "engine started",
                 "KV cache is too small", "a megatron warning"):
        assert line in text, line
    shown = proc.stderr.strip().splitlines()
    assert len(shown) == 3, proc.stderr  # each real problem once; nothing harmless, nothing quiet
    assert "RuntimeWarning: something is really off" in shown[0] and str(logs[0]) in shown[0]
    assert "KV cache is too small" in shown[1] and "WARNING megatron.core.x: a megatron warning" == shown[2]
    assert proc.stdout == ""


def test_without_a_log_dir_nothing_changes(tmp_path):
    proc = _run_worker(tmp_path, None)
    assert proc.returncode == 0
    assert "plain print from the worker" in proc.stdout and "C-level write" in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_unwritable_log_dir_leaves_the_output_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run_worker(tmp_path, blocker / "logs")
    assert proc.returncode == 0
    assert "cannot write a log under" in proc.stderr and "plain print from the worker" in proc.stdout


def test_known_harmless_messages():
    assert console.is_harmless("UserWarning: Apex is not installed. Falling back to Torch Norm")
    assert console.is_harmless("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.")
    assert not console.is_harmless("loss is NaN")
    assert all(why for _, why in console.KNOWN_HARMLESS)


def test_driver_output_is_copied_to_driver_log(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from megatron_tppo import console
        d = console.start_run_logs({str(tmp_path)!r})
        print("step 1 | reward 0.5")
        sys.stderr.write("\\rT-PPO:  50%|#####     | 1/2")
        sys.stderr.write("[tppo] a problem\\n")
        import os; print(os.environ["{console.LOG_DIR_ENV}"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "step 1 | reward 0.5" in proc.stdout and "T-PPO" in proc.stderr  # the console is unchanged
    log = (tmp_path / "logs" / "driver.log").read_text()
    assert "step 1 | reward 0.5" in log and "[tppo] a problem" in log and "T-PPO" not in log
    assert str((tmp_path / "logs").resolve()) in proc.stdout

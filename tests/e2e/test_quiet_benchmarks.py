"""The benchmarks' console is as quiet as `train`'s (issue 21 item 6): benchmarks/tppo_vs_ppo.py on
the tiny model, one mode, a few seconds of budget, shows its progress and its table, and the
workers' library output (megatron-core's Apex and `.grad` warnings, vLLM's) is in
``<run-dir>/logs/`` instead."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.e2e.test_quiet_console import NOISE

REPO = Path(__file__).resolve().parents[2]
# vLLM's log line ("(... pid=N) WARNING 12-02 05:15:48 [file.py:N] ...") and Python's warnings.warn echo
LIBRARY_LINE = re.compile(r"\b(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[|^\s*warnings\.warn\(|megatron/core/")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tppo_vs_ppo_console_has_table_and_no_library_noise(tiny_model, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results" / "tppo_vs_ppo.json"
    cmd = [sys.executable, str(REPO / "benchmarks/tppo_vs_ppo.py"), "--config", str(REPO / "examples/tiny_cpu.yaml"),
           "--modes", "tppo", "--budget-s", "2", "--eval-every-s", "1000", "--final-eval-prompts", "0",
           "--out", str(out), "--run-dir", str(runs),
           *TINY_MODEL, f"model.hf_path={tiny_model}", "rollout.num_slots=8", "rollout.samples_per_prompt=4",
           "rollout.window_tokens=12", "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2",
           "data.eval_prompts=8", "logging.rollout_dump=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS", "TPPO_LOG_DIR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    # its own lines: the mode it starts, the step lines, the table, where the results went
    assert "[tppo_vs_ppo] seed 1234: tppo" in console and "step 1 |" in console, console
    assert re.search(r"^mode\s+window\s+steps", console, re.M), console
    assert re.search(r"^tppo\s+12\s+\d+", console, re.M), console
    assert f"wrote {out}" in console, console
    shown = [n for n in NOISE if n in console] + [ln for ln in console.splitlines() if LIBRARY_LINE.search(ln)]
    assert not shown, f"noise on the console: {shown}\n{console}"

    # the library output is kept, in the log directory that the console names
    logs = runs / "logs"
    assert f"library output (megatron-core, vLLM, Ray workers): {logs.resolve()}" in console, console
    assert "step 1 |" in (logs / "driver.log").read_text()
    text = "\n".join(w.read_text(errors="replace") for w in logs.glob("worker-*.log"))
    assert "Apex is not installed" in text and "not a leaf Tensor" in text, sorted(logs.iterdir())
    assert out.is_file() and out.with_suffix(".png").is_file()

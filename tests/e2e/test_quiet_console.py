"""`make run`'s console: the step lines and nothing of the library noise that used to fill it, while
the run directory keeps all of it (logs/driver.log, logs/worker-<host>-<pid>.log). The same real
run (its own local Ray cluster, megatron-core, vLLM) checks the wall-clock checkpoint cadence
(checkpoint.save_every_s) and perf/checkpoint_s."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tppo.monitoring import read_scalars
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
# what the console showed before (issue 14): none of it may come back
NOISE = ["Apex is not installed", "Transformer Engine and Apex are not installed", "not a leaf Tensor",
         "full scope is deprecated", "Token authentication", "Started a local Ray instance",
         "Chat template warmup failed", "Traceback", "UserWarning", "FutureWarning", "LD_PRELOAD",
         "NUMA binding", "Triton", "Loading safetensors", "set_num_threads", "Failed to load weights",
         "global random seed", "chunked prefill", "Enforce eager", "EOS token id"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_console_shows_steps_and_no_library_noise(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(REPO / "examples/tiny_cpu.yaml"), *TINY_MODEL, f"model.hf_path={tiny_model}",
            "steps=2", "data.eval_every=0", "rollout.num_slots=8", "rollout.samples_per_prompt=4",
            "rollout.window_tokens=12", "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2",
            "algorithm.critic_warmup_steps=1",  # step 2 updates the policy and syncs the engine
            "checkpoint.save_every_s=0.001", f"logging.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "megatron_tppo.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=840)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    assert "step 1 |" in console and "step 2 |" in console, console
    shown = [n for n in NOISE if n in console]
    assert not shown, f"noise on the console: {shown}\n{console}"
    assert len(console.splitlines()) < 30, console

    logs = out / "logs"
    driver = (logs / "driver.log").read_text()
    # kept, off the console (Ray's token notice is not checked here: Ray prints it only when it
    # first creates the machine's token, so whether it comes depends on the runs before this one)
    assert "step 2 |" in driver, driver[-3000:]
    workers = sorted(logs.glob("worker-*.log"))
    assert len(workers) >= 3, workers  # rollout engine, policy, critic
    text = "\n".join(w.read_text(errors="replace") for w in workers)
    assert "Apex is not installed" in text and "Chat template warmup failed" in text

    # save_every_s below a step's length: a checkpoint after every step, each waited for
    for step in (1, 2):
        assert (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    tb = read_scalars(out / "tensorboard")
    assert [s for s, _ in tb["perf/checkpoint_s"]] == [1, 2]
    assert all(v > 0 for _, v in tb["perf/checkpoint_s"])

"""Shared by the end-to-end tests: ONE Ray cluster per test session, a tiny random model, a runner
for a few T-PPO steps (in this process or as a separate driver process joining the cluster), and
one uninterrupted reference run that the resume and fault tests compare against (the tiny model
itself is tests/conftest.py's)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.monitoring import read_scalars
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
# 8 slots x groups of 4, windows of 12 tokens, responses of at most 30: three windows at most
SMALL = ["rollout.num_slots=8", "rollout.samples_per_prompt=4", "rollout.window_tokens=12",
         "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2", "algorithm.critic_warmup_steps=1",
         "data.eval_prompts=4", "data.eval_every=3", "data.eval_samples_per_prompt=2", "logging.progress_bar=false",
         "logging.rollout_dump=true"]
# the reference run for resume/fault tests: no evaluation (it does not change the training state)
RESUME_COMMON = ["data.eval_every=0", "steps=4"]


# logical GPUs: every e2e run places its actors as on a GPU node (one bundle per GPU, colocation)
RAY_GPUS = 8


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, num_gpus=RAY_GPUS, include_dashboard=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tiny_overrides(out: Path, model_dir: Path, extra: list[str]) -> list[str]:
    return TINY_MODEL + [f"model.hf_path={model_dir}", "steps=3"] + SMALL + [f"logging.output_dir={out}"] + extra


def run_tiny(out: Path, model_dir: Path, extra: list[str]):
    """A few T-PPO steps in this process (on the session's Ray cluster); (cfg, TensorBoard scalars)."""
    from megatron_tppo.train import run

    cfg = load_config(str(REPO / "examples/tiny_cpu.yaml"), tiny_overrides(out, model_dir, extra))
    run(cfg)
    return cfg, read_scalars(out / "tensorboard")


class Driver:
    """``python -m megatron_tppo.train`` as its own process (own session), joined to the test's Ray
    cluster, as a launcher would start it; stdout+stderr go to ``<out>/driver.log``."""

    def __init__(self, out: Path, model_dir: Path, ray_address: str, extra: list[str]):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.log_path = out, out / "driver.log"
        args = ["--config", str(REPO / "examples/tiny_cpu.yaml"),
                *tiny_overrides(out, model_dir, extra), f"parallel.ray_address={ray_address}"]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "megatron_tppo.train", *args], cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, path: Path, timeout_s: float = 300.0) -> None:
        deadline = time.time() + timeout_s
        while not path.exists():
            assert self.proc.poll() is None, f"driver exited ({self.proc.returncode}) early:\n{self.log()}"
            assert time.time() < deadline, f"{path} did not appear within {timeout_s} s:\n{self.log()}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver did not exit within {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]


@pytest.fixture
def driver(tiny_model, ray_cluster):
    """Start drivers with ``driver(out, extra_overrides)``; any still running at the end are killed."""
    started: list[Driver] = []

    def start(out: Path, extra: list[str]) -> Driver:
        d = Driver(out, tiny_model, ray_cluster, extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture(scope="session")
def straight_run(ray_cluster, tiny_model, tmp_path_factory):
    """4 uninterrupted steps: (run dir, TensorBoard scalars)."""
    out = tmp_path_factory.mktemp("straight")
    _, tb = run_tiny(out, tiny_model, RESUME_COMMON)
    return out, tb


def check_memory_trace(cfg, out: Path, expected: list[list[str]]) -> None:
    """``<out>/memory_trace.jsonl`` (what the controller moved, and what the components then
    reported) matches the memory schedule call for call, and visits ``expected`` phases, one list
    per driver process (megatron_tppo.planning.schedule.run_phases)."""
    import json

    from megatron_tppo.planning.schedule import check_trace

    records = [json.loads(line) for line in (out / "memory_trace.jsonl").read_text().splitlines()]
    assert check_trace(cfg, records) == expected


def saves_of(cfg, steps: range) -> set[int]:
    """The step counts after which a run of ``cfg`` executing ``steps`` saves (save_every, and its last)."""
    every = cfg.checkpoint.save_every
    return {s + 1 for s in steps if every and (s + 1) % every == 0} | {steps[-1] + 1}

"""Shared fixtures: real multi-process jobs (gloo) with timeouts and cleanup."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the tiny random model of the end-to-end and Slurm tests (examples/tiny_cpu.yaml, made smaller)
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
              "model.num_attention_heads=4", "model.num_query_groups=2", "model.max_position_embeddings=128"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``world`` processes of ``python -m <module> <args...>`` with torchrun-style env variables."""

    def __init__(self, module: str, args: list[str], world: int, log_dir: Path, name: str):
        port = free_port()
        self.name, self.procs, self.logs = name, [], []
        for rank in range(world):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                       PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
            log = open(log_dir / f"{name}_rank{rank}.log", "w")
            self.logs.append(log)
            # own session: a timeout kills the rank and everything it started
            self.procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, deadline: float) -> None:
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job {self.name} timed out; logs: {[log.name for log in self.logs]}")
        finally:
            for log in self.logs:
                log.close()
        bad = [(i, p.returncode) for i, p in enumerate(self.procs) if p.returncode != 0]
        if bad:
            self.kill()
            tail = Path(self.logs[bad[0][0]].name).read_text()[-4000:]
            raise AssertionError(f"job {self.name}: ranks {bad} failed\n{tail}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


@pytest.fixture(scope="session")
def run_jobs(tmp_path_factory):
    """run_jobs([(name, module, args, world), ...], timeout_s) -> out dir: start all, wait for all.

    The out dir is appended to each job's arguments.
    """
    started: list[Job] = []

    def run(specs, timeout_s: float = 240.0) -> Path:
        out = tmp_path_factory.mktemp("jobs")
        jobs = [Job(module, [*args, str(out)], world, out, name) for name, module, args, world in specs]
        started.extend(jobs)
        deadline = time.time() + timeout_s
        try:
            for job in jobs:
                job.wait(deadline)
        finally:
            for job in jobs:
                job.kill()
        return out

    yield run
    for job in started:
        job.kill()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random HF model of TINY_MODEL's shape with the char tokenizer, saved once per session."""
    from megatron_tppo.config_io import load_config
    from megatron_tppo.data.tokenizer import save_tokenizer
    from megatron_tppo.weights.hf_config import save_random_hf_model

    path = tmp_path_factory.mktemp("model")
    save_random_hf_model(load_config(str(REPO / "examples/tiny_cpu.yaml"), TINY_MODEL).model, path, seed=0)
    save_tokenizer(path)
    return path

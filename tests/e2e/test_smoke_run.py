"""slurm/smoke.sh without Slurm (the tiny model, a local Ray with 2 logical GPUs as on a 2-GPU
node): every check of the report passes. The Slurm run is tests/slurm/test_slurm_launch.py's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# small steps: 8 slots in groups of 4, windows of 12 tokens, responses of at most 30
SMOKE_SMALL = ["rollout.num_slots=8", "rollout.samples_per_prompt=4", "rollout.window_tokens=12",
               "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2", "parallel.threads_per_worker=1"]


def test_smoke_script_passes_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "smoke"
    env = dict(os.environ, TPPO_PYTHON=sys.executable, TPPO_SMOKE_OUT=str(out), CUDA_VISIBLE_DEVICES="0,1",
               PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", str(ROOT / "slurm" / "smoke.sh"), str(tiny_model), *TINY_MODEL, *SMOKE_SMALL],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    report = (out / "smoke_report.txt").read_text() if (out / "smoke_report.txt").exists() else r.stdout + r.stderr
    assert r.returncode == 0, report + "\n" + ((out / "smoke_part1.log").read_text()[-3000:]
                                              if (out / "smoke_part1.log").exists() else "")
    assert report.startswith("T-PPO smoke test: PASS (7/7)") and "[FAIL]" not in report, report
    assert "placement: 2 of 2 GPUs requested" in (out / "smoke_part1.log").read_text()
    print(report)

"""``python -m megatron_tppo.evaluate`` on the tiny model, checked against a plain loop that scores
the same prompts and generated samples with the reward function directly; then the same model as
a run's checkpoint (converted back to HF by the evaluator) gives the same report."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tppo.config_io import dump_yaml, load_config
from tests.conftest import REPO, TINY_MODEL
from tests.e2e.eval_reward import digit_reward
from tests.e2e.test_quiet_console import NOISE

PROMPTS, K, CAP = 6, 3, 24


def overrides(model_dir: Path) -> list[str]:
    return TINY_MODEL + [f"model.hf_path={model_dir}", f"rollout.max_response_tokens={CAP}", "rollout.temperature=1.0",
                         "data.reward=tests.e2e.eval_reward:digit_reward"]


def run_cli(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "megatron_tppo.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    return console


def plain_loop(model_dir: Path, samples: list[dict]) -> tuple[list[list[float]], list[list[int]]]:
    """The reference: the same held-out prompts, each sample's tokens decoded and scored by the reward."""
    from megatron_tppo.data.datasets import build_eval_prompts
    from megatron_tppo.data.tokenizer import load_tokenizer, make_encoder

    cfg = load_config(str(REPO / "examples/tiny_cpu.yaml"), overrides(model_dir) + [f"data.eval_prompts={PROMPTS}"])
    tok = load_tokenizer(model_dir)
    prompts = build_eval_prompts(cfg.data, make_encoder(tok), cfg.seed)
    assert len(prompts) == PROMPTS and len(samples) == PROMPTS * K
    rewards, lengths = [], []
    for i, p in enumerate(prompts):
        rows = [s for s in samples if s["prompt"] == p.uid]
        assert [s["sample"] for s in rows] == list(range(K))
        rewards.append([digit_reward(tok.decode(s["token_ids"], skip_special_tokens=True), p.meta) for s in rows])
        lengths.append([len(s["token_ids"]) for s in rows])
    return rewards, lengths


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_cli_matches_a_plain_loop_and_a_run_checkpoint(tiny_model, tmp_path):
    cfg_args = ["--config", str(REPO / "examples/tiny_cpu.yaml"), "--prompts", str(PROMPTS), "--samples", str(K),
                "--bootstrap", "20000"]
    console = run_cli([*cfg_args, "--model", str(tiny_model), "--out", str(tmp_path / "hf.json"),
                       "--samples-out", str(tmp_path / "hf.jsonl"), *overrides(tiny_model)], tmp_path)
    shown = [n for n in NOISE if n in console]
    assert not shown and len(console.splitlines()) < 15, console
    assert "pass@1" in console and (tmp_path / "hf.log").stat().st_size > 0  # library output: in the log

    got = json.loads((tmp_path / "hf.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "hf.jsonl").read_text().splitlines()]
    rewards, lengths = plain_loop(tiny_model, samples)
    flat = [r for rs in rewards for r in rs]
    assert 0 < sum(flat) < len(flat)  # the reward tells samples apart
    assert got["rewards"] == rewards and got["lengths"] == lengths
    assert got["accuracy"] == pytest.approx(sum(flat) / len(flat), abs=1e-12)
    assert got["response_length_mean"] == pytest.approx(sum(map(sum, lengths)) / len(flat), abs=1e-12)
    per_prompt = [sum(r) / K for r in rewards]
    assert got["accuracy_se"] == pytest.approx(statistics.pstdev(per_prompt) / math.sqrt(PROMPTS), rel=0.05)
    assert sum(b["count"] for b in got["buckets"]) == len(flat)
    assert (got["num_prompts"], got["samples_per_prompt"]) == (PROMPTS, K)
    assert all(s["reward"] == rewards[s["prompt"]][s["sample"]] for s in samples)

    # the same weights as a run's newest checkpoint (a training checkpoint has no conversion sidecar)
    from megatron_tppo.weights.convert import SIDECAR, HFToMegatronJob, convert_hf_to_megatron

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    convert_hf_to_megatron([HFToMegatronJob(str(tiny_model), str(step / "policy"), dtype="fp32")], progress=False)
    (step / "policy" / SIDECAR).unlink()
    (step / "COMPLETE").write_text("")
    (run / "checkpoints" / "step_00000001").mkdir()  # not whole (no COMPLETE): never chosen
    (run / "config.yaml").write_text(dump_yaml(load_config(str(REPO / "examples/tiny_cpu.yaml"), overrides(tiny_model))))
    run_cli(["--checkpoint", str(run), "--prompts", str(PROMPTS), "--samples", str(K), "--bootstrap", "20000",
             "--out", str(tmp_path / "ckpt.json"), "--samples-out", str(tmp_path / "ckpt.jsonl")], tmp_path)
    ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert ckpt["checkpoint"] == str(step / "policy")
    assert (ckpt["rewards"], ckpt["lengths"], ckpt["accuracy"], ckpt["accuracy_se"]) == \
        (got["rewards"], got["lengths"], got["accuracy"], got["accuracy_se"])
    assert (tmp_path / "ckpt.jsonl").read_text() == (tmp_path / "hf.jsonl").read_text()
    shutil.rmtree(run)

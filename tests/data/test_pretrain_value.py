"""tools/pretrain_value.py on a tiny SFT build: real vLLM sampling, the megatron critic update, reuse,
the checkpoint the run loads (``checkpoint.load_critic``), and the error for a directory without a build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCH = ["model.hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=128", "rollout.max_response_tokens=24", "rollout.window_tokens=8",
        "model.max_position_embeddings=128"]


def tool(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    over = [x for o in ARCH for x in ("--override", o)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / name), *args, *over], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_pretrain_value_trains_saves_and_reuses(tmp_path):
    model = tmp_path / "sft"
    tool("build_tiny_model.py", "--out", str(model), "--steps", "5", "--batch-size", "4", "--eval-prompts", "4",
         "--quiet")
    tool("pretrain_value.py", "--model", str(model), "--prompts", "6", "--passes", "2", "--batch", "8")
    out = model / "value_critic"
    info = json.loads((out / "tppo_value.json").read_text())
    assert info["responses"] == 6 * 8  # samples_per_prompt of examples/tiny_cpu.yaml
    assert info["heldout_responses"] == 8 and info["train_responses"] == 40  # one prompt group of 6 held out
    assert info["critic_steps"] == 2 * 5  # two passes of ceil(40 / 8) batches
    assert (out / "metadata.json").is_file()
    for k in ("explained_variance_before", "explained_variance_after", "reward_mean"):
        assert info[k] == info[k]  # finite, not NaN

    t0 = time.monotonic()
    again = tool("pretrain_value.py", "--model", str(model), "--prompts", "6", "--passes", "2", "--batch", "8")
    assert "reusing it" in again.stdout and time.monotonic() - t0 < 60

    # the checkpoint is what the run's critic loads: same architecture, trained head (not the fresh one)
    check = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from megatron_tppo.config_io import load_config
from megatron_tppo.config import LayoutConfig
from megatron_tppo.training import TrainEngine, init_parallel
cfg = load_config({str(ROOT / 'examples/tiny_cpu.yaml')!r}, {ARCH!r})
init_parallel(1, 1, "cpu")
fresh = TrainEngine(cfg.model, LayoutConfig(), cfg.optim.critic, role="critic", device="cpu", seed=cfg.seed + 1)
loaded = TrainEngine(cfg.model, LayoutConfig(), cfg.optim.critic, role="critic", device="cpu", seed=cfg.seed + 1)
loaded.load({str(out)!r}, with_optimizer=False)
b = {{"tokens": torch.randint(3, 90, (2, 12)), "attention_mask": torch.ones(2, 12)}}
v0, v1 = fresh.forward(b)["values"], loaded.forward(b)["values"]
assert torch.isfinite(v1).all() and not torch.equal(v0, v1)
print("LOADED-OK")
"""
    res = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "LOADED-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_pretrain_value_refuses_a_directory_without_a_build(tmp_path):
    res = tool("pretrain_value.py", "--model", str(tmp_path), check=False)
    assert res.returncode != 0 and "tppo_build.json" in res.stdout + res.stderr

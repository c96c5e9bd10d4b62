"""Smoke test of tools/build_tiny_model.py: a few SFT steps of a very small model, then reuse.

The real build (the config's architecture, about a thousand steps) runs in `make run`, not in the tests.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.ffn_hidden_size=128", "rollout.max_response_tokens=24", "rollout.window_tokens=8"]


def load_tool():
    spec = importlib.util.spec_from_file_location("build_tiny_model", ROOT / "tools" / "build_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_then_reuse(tmp_path):
    pytest.importorskip("transformers")
    tool = load_tool()
    argv = ["--out", str(tmp_path / "m"), "--steps", "5", "--batch-size", "4", "--eval-prompts", "4", "--quiet"]
    for o in TINY:
        argv += ["--override", o]
    info = tool.build(tool.parse_args(argv))
    out = tmp_path / "m"
    assert all((out / f).is_file() for f in tool.MODEL_FILES)
    saved = json.loads((out / "tppo_build.json").read_text())
    assert saved["steps"] == 5 and 0.0 <= saved["heldout_accuracy"] <= 1.0 and saved["heldout_prompts"] == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 512 and cfg["hidden_size"] == 64 and cfg["tie_word_embeddings"] is True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert tok.eos_token_id == model.generation_config.eos_token_id == 1
    assert model.get_input_embeddings().weight.shape[0] == 512 > len(tok)
    # transformers 5 loads a qwen2 model dir with Qwen2Tokenizer whatever tokenizer_config.json
    # says: the characters (spaces included) must still map to the ids the model was trained on
    from megatron_tppo.data import tokenizer as chartok

    text = "47 a+8 b-3 ?\na+8:47=55 #55"
    assert tok.encode(text, add_special_tokens=False) == [chartok.VOCAB[c] for c in text]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    t = time.monotonic()
    again = tool.build(tool.parse_args(argv))  # same settings: reused, not rebuilt
    assert time.monotonic() - t < 5 and again == info
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

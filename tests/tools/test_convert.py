"""Checkpoint conversion HF <-> megatron torch_dist (tools/convert_*.py, megatron_tppo.weights.convert).

Two launches of two gloo ranks do all conversions (layouts TP1/TP2/PP2, three models); the round
trip must be bit-exact in fp32. Errors are checked in-process (they come before any launch).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights.convert import (
    SIDECAR, VALUE_HEAD_FILE, ConvertError, HFToMegatronJob, MegatronToHFJob, convert_hf_to_megatron,
    convert_megatron_to_hf)
from megatron_tppo.weights.hf_config import save_random_hf_model
from megatron_tppo.weights.hf_io import HFCheckpoint, HFCheckpointError
from tests.conftest import REPO

# vLLM on CPU needs head size >= 32; odd vocabularies exercise the padding to 256.
QWEN = ModelConfig(arch="qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=96, num_attention_heads=4,
                   num_query_groups=2, vocab_size=203, max_position_embeddings=64, qkv_bias=True,
                   tie_word_embeddings=True)
LLAMA = dataclasses.replace(QWEN, arch="llama", qkv_bias=False, tie_word_embeddings=False, hidden_size=64,
                            num_attention_heads=2, vocab_size=250)
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
CORRUPT = "model.layers.1.mlp.down_proj.weight"


def load_hf(d) -> dict:
    ck = HFCheckpoint(d)
    return {n: ck[n] for n in ck.names()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    save_random_hf_model(QWEN, root / "qwen", seed=1)
    save_random_hf_model(LLAMA, root / "llama", seed=2)
    (root / "qwen" / "tokenizer.json").write_text('{"fake": true}')
    shutil.copytree(root / "qwen", root / "qwen_corrupt")
    sd = load_file(str(root / "qwen_corrupt" / "model.safetensors"))
    sd[CORRUPT] = sd[CORRUPT] + 0.05
    save_file(sd, str(root / "qwen_corrupt" / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    to_meg = [HFToMegatronJob(str(hf / k), str(out / f"{k}_{lay}"), *LAYOUTS[lay], "fp32")
              for k in ("qwen", "llama") for lay in LAYOUTS]
    to_meg += [HFToMegatronJob(str(hf / "qwen"), str(out / "critic_tp2"), 2, 1, "fp32", critic=True),
               HFToMegatronJob(str(hf / "qwen_corrupt"), str(out / "corrupt_tp1"), 1, 1, "fp32")]
    s1 = convert_hf_to_megatron(to_meg, progress=False)
    # back to HF: at TP1 (DP2 here), loaded at TP2 and at PP2 (resharding), small shards for PP2
    to_hf = [MegatronToHFJob(str(out / f"{k}_{lay}"), str(out / f"{k}_{lay}_hf"), *LAYOUTS[back])
             for k in ("qwen", "llama") for lay, back in zip(LAYOUTS, ("tp2", "pp2", "tp1"))]
    to_hf.append(MegatronToHFJob(str(out / "qwen_pp2"), str(out / "qwen_sharded_hf"), 1, 2, max_shard_size=60_000))
    to_hf.append(MegatronToHFJob(str(out / "critic_tp2"), str(out / "critic_hf"), 1, 1))
    s2 = convert_megatron_to_hf(to_hf, progress=False)
    return out, s1, s2


@pytest.mark.distributed
@pytest.mark.parametrize("lay", list(LAYOUTS))
@pytest.mark.parametrize("key", ["qwen", "llama"])
def test_round_trip_bit_exact(hf, converted, key, lay):
    out, _, _ = converted
    src, back = load_hf(hf / key), load_hf(out / f"{key}_{lay}_hf")
    if key == "qwen":
        src.pop("lm_head.weight", None)  # tied: HF keeps no separate head
    assert set(back) == set(src)
    for n, t in src.items():
        assert back[n].dtype == torch.float32 and torch.equal(back[n], t), n


@pytest.mark.distributed
def test_output_dir_loads_in_transformers(hf, converted):
    import transformers

    out, s1, s2 = converted
    x = torch.randint(0, LLAMA.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    a = transformers.AutoModelForCausalLM.from_pretrained(hf / "llama").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out / "llama_pp2_hf").eval()
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert json.loads((out / "llama_pp2_hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "llama_pp2_hf" / "generation_config.json").is_file()
    assert all(r["peak_rss_bytes"] > 0 for r in s1["ranks"] + s2["ranks"])


@pytest.mark.distributed
def test_sharded_output_and_sidecar(hf, converted):
    out, _, _ = converted
    d = out / "qwen_sharded_hf"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in d.glob("*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_hf(d).values())
    assert (d / "tokenizer.json").read_text() == '{"fake": true}'  # carried via the checkpoint
    side = json.loads((out / "qwen_pp2" / SIDECAR).read_text())
    assert (side["tp"], side["pp"], side["dtype"], side["role"]) == (1, 2, "fp32", "policy")
    assert side["model_config"]["vocab_size"] == 203


@pytest.mark.distributed
def test_critic_to_hf(hf, converted):
    out, _, _ = converted
    d = out / "critic_hf"
    src, back = load_hf(hf / "qwen"), load_hf(d)
    assert set(back) == set(src) - {"lm_head.weight"}
    assert all(torch.equal(back[n], src[n]) for n in back)  # same backbone
    head = load_file(str(d / VALUE_HEAD_FILE))
    assert head["value_head.weight"].shape == (1, QWEN.hidden_size) and head["value_head.bias"].shape == (1,)
    assert VALUE_HEAD_FILE not in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((out / "critic_tp2" / SIDECAR).read_text())["role"] == "critic"


def run_tool(name, *args, timeout=300):
    r = subprocess.run([sys.executable, f"tools/{name}.py", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return r.returncode, r.stdout, r.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_check_parity_layouts_and_vllm(hf, converted):
    """A converted checkpoint, resharded to TP1/TP2/PP2, matches transformers; vLLM (started from
    the round-tripped HF dir, then synced from megatron) too."""
    out, _, _ = converted
    rc, so, se = run_tool("check_parity", "--hf-dir", out / "qwen_tp2_hf", "--checkpoint", out / "qwen_tp2",
                          "--layouts", "1x1,2x1,1x2", "--vllm", "--tol", "1e-5")
    assert rc == 0, so[-3000:] + se[-3000:]
    lines = so.strip().splitlines()
    assert lines[-1].startswith("worst max |Δ| = ") and lines[-1].endswith("OK)")
    assert float(lines[-1].split("=")[1].split()[0]) < 1e-5
    assert sum("vLLM<-megatron" in ln for ln in lines) == 6 and sum(ln.startswith("megatron tp") for ln in lines) == 3


@pytest.mark.distributed
def test_check_parity_detects_corrupt_checkpoint(hf, converted):
    out, _, _ = converted
    rc, so, se = run_tool("check_parity", "--hf-dir", hf / "qwen", "--checkpoint", out / "corrupt_tp1")
    assert rc == 1, so[-3000:] + se[-3000:]
    last = so.strip().splitlines()[-1]
    assert last.endswith("FAIL)") and float(last.split("=")[1].split()[0]) > 1e-3


# ------------------------------------------------------------------ errors, before any launch


def test_error_existing_output(hf, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "x").write_text("keep me")
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert_hf_to_megatron([HFToMegatronJob(str(hf / "qwen"), str(tmp_path / "ck"))])
    assert (tmp_path / "ck" / "x").read_text() == "keep me"
    rc, _, se = run_tool("convert_hf_to_megatron", "--hf-dir", hf / "qwen", "--output", tmp_path / "ck")
    assert rc == 2 and "already exists" in se


def test_error_unsupported_architecture(hf, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(hf / "qwen", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match="unsupported architecture model_type='gpt2'"):
        convert_hf_to_megatron([HFToMegatronJob(str(d), str(tmp_path / "out"))])


def test_error_shape_mismatch(hf, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(hf / "llama", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ConvertError, match=r"shape mismatch: .*mlp.down_proj.weight: \(64, 96\)"):
        convert_hf_to_megatron([HFToMegatronJob(str(d), str(tmp_path / "out"))])


def test_error_missing_shard_and_dir(hf, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(hf / "llama", d)
    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    with pytest.raises(HFCheckpointError, match="shard\\(s\\) missing: .*model-00001-of-00001"):
        convert_hf_to_megatron([HFToMegatronJob(str(d), str(tmp_path / "out"))])
    with pytest.raises(HFCheckpointError, match="does not exist"):
        convert_hf_to_megatron([HFToMegatronJob(str(tmp_path / "nope"), str(tmp_path / "out"))])


def test_error_layout_and_bad_checkpoint(hf, tmp_path):
    with pytest.raises(ConvertError, match="num_layers=2 is not divisible by pp=3"):
        convert_hf_to_megatron([HFToMegatronJob(str(hf / "qwen"), str(tmp_path / "o"), 1, 3)])
    with pytest.raises(ConvertError, match="not a torch_dist checkpoint"):
        convert_megatron_to_hf([MegatronToHFJob(str(hf / "qwen"), str(tmp_path / "o"))])

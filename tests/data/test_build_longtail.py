"""tools/build_tiny_model.py --task longtail: a few SFT steps, the prompt files beside the model."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_build_longtail_writes_disjoint_jsonl(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_model", ROOT / "tools" / "build_tiny_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "m"
    argv = ["--task", "longtail", "--config", str(ROOT / "examples" / "longtail_cpu.yaml"), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--eval-prompts", "4", "--target-accuracy", "0",
            "--jsonl-rows", "200", "--quiet", "--override", "rollout.max_response_tokens=64"]
    info = tool.build(tool.parse_args(argv))
    assert info["settings"]["task"]["name"] == "longtail" and info["settings"]["task"]["max_steps"] == 5
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 200 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert max(r["steps"] for r in train) <= 5


TINY_ARCH = ["model.hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2", "model.num_query_groups=1",
             "model.ffn_hidden_size=128"]


def _tool():
    spec = importlib.util.spec_from_file_location("build_tiny_model", ROOT / "tools" / "build_tiny_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _args(*pairs: str) -> list[str]:
    return [x for o in pairs for x in ("--override", o)]


def test_init_from_starts_the_longtail_build_from_the_arith_weights(tmp_path):
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    tool = _tool()
    src, dst = tmp_path / "arith", tmp_path / "long"
    tool.build(tool.parse_args(["--out", str(src), "--steps", "3", "--batch-size", "4", "--eval-prompts", "2",
                                "--quiet", *_args(*TINY_ARCH, "rollout.max_response_tokens=24")]))
    common = ["--task", "longtail", "--config", str(ROOT / "examples" / "longtail_cpu.yaml"), "--batch-size", "4",
              "--eval-prompts", "2", "--target-accuracy", "0", "--jsonl-rows", "40", "--quiet"]
    # zero SFT steps: the saved model is the source model, tensor for tensor (context length differs)
    info = tool.build(tool.parse_args(common + ["--out", str(dst), "--steps", "0", "--init-from", str(src),
                                                *_args(*TINY_ARCH, "rollout.max_response_tokens=64")]))
    assert info["steps"] == 0 and info["settings"]["init_from"]["task"]["max_steps"] > 0
    a = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(dst), local_files_only=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another architecture is refused, naming the flag
    with pytest.raises(SystemExit, match="--init-from"):
        tool.build(tool.parse_args(common + ["--out", str(tmp_path / "bad"), "--steps", "0", "--init-from", str(src),
                                             *_args(*TINY_ARCH, "model.hidden_size=128",
                                                    "rollout.max_response_tokens=64")]))
    with pytest.raises(SystemExit, match="tppo_build.json"):
        tool.build(tool.parse_args(common + ["--out", str(tmp_path / "x"), "--steps", "0",
                                             "--init-from", str(tmp_path / "nowhere")]))

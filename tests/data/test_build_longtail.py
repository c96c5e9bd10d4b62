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

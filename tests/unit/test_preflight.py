"""The entry point's checks before any heavy start: they fail in well under a second, exit 2,
name the field, and write nothing outside the run directory."""
from __future__ import annotations

import json
import os
import time

import pytest

from megatron_tppo.config_io import load_config
from megatron_tppo.train import main

REPO_CFG = "examples/tiny_cpu.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Only config.json matters to the preflight (the weights are read later, by the workers)."""
    from megatron_tppo.weights.hf_config import hf_config_kwargs

    d = tmp_path_factory.mktemp("model")
    cfg = load_config(REPO_CFG, [])
    kw = hf_config_kwargs(cfg.model, eos_token_id=1)
    kw["architectures"] = ["Qwen2ForCausalLM"]
    kw["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(kw))
    return d


def _main(capsys, *overrides) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    rc = main(["--config", REPO_CFG, *overrides])
    return rc, capsys.readouterr().err, time.perf_counter() - t0


def test_output_dir_under_a_file_is_refused(capsys, tmp_path, model_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err, seconds = _main(capsys, f"model.hf_path={model_dir}", f"logging.output_dir={blocker}/run")
    assert rc == 2 and "logging.output_dir=" in err and "is not writable" in err, err
    assert blocker.read_text() == "not a directory" and seconds < 5


def test_checkpoint_dir_that_cannot_be_created_is_refused(capsys, tmp_path, model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints go")
    rc, err, _ = _main(capsys, f"model.hf_path={model_dir}", f"logging.output_dir={out}")
    assert rc == 2 and "is not writable" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_read_only_output_dir_is_refused(capsys, tmp_path, model_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err, _ = _main(capsys, f"model.hf_path={model_dir}", f"logging.output_dir={ro}/run")
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "is not writable" in err, err


def test_missing_model_dir_is_refused(capsys, tmp_path):
    rc, err, _ = _main(capsys, f"model.hf_path={tmp_path}/nope", f"logging.output_dir={tmp_path}/run")
    assert rc == 2 and "model.hf_path" in err and "does not exist" in err, err
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_model_dir_that_does_not_match_the_config_is_refused(capsys, tmp_path, model_dir):
    rc, err, _ = _main(capsys, f"model.hf_path={model_dir}", "model.num_layers=3", f"logging.output_dir={tmp_path}/r")
    assert rc == 2 and "model.num_layers=3" in err, err


@pytest.mark.parametrize("reward,msg", [
    ("tests.no_such_module:fn", "cannot be imported: ModuleNotFoundError"),
    ("megatron_tppo.rewards:no_such_fn", "cannot be imported: AttributeError"),
])
def test_reward_that_cannot_be_imported_is_refused(capsys, tmp_path, model_dir, reward, msg):
    rc, err, _ = _main(capsys, f"model.hf_path={model_dir}", f"data.reward={reward}", f"logging.output_dir={tmp_path}/r")
    assert rc == 2 and "data.reward" in err and msg in err, err


def test_resume_flag_is_checkpoint_resume():
    from megatron_tppo.train import parse_config

    assert parse_config(["--config", REPO_CFG, "--resume"])[0].checkpoint.resume is True
    assert parse_config(["--config", REPO_CFG, "steps=3"])[0].checkpoint.resume is False


def test_missing_data_file_is_refused(capsys, tmp_path, model_dir):
    rc, err, seconds = _main(capsys, f"model.hf_path={model_dir}", "data.task=jsonl",
                             f"data.train_path={tmp_path}/nope.jsonl", f"logging.output_dir={tmp_path}/r")
    assert rc == 2 and "data.train_path" in err and "does not exist" in err and seconds < 5, err


def test_malformed_row_with_bad_rows_error_is_one_line_and_exit_2(tmp_path, model_dir):
    """Like a bad config: the file and line of the bad row, exit 2, no traceback (a real process:
    the entry point reads the dataset before any cluster starts)."""
    import shutil
    import subprocess
    import sys

    from megatron_tppo.data.tokenizer import save_tokenizer

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    save_tokenizer(model)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3", "answer"\n')
    out = subprocess.run([sys.executable, "-m", "megatron_tppo.train", "--config", REPO_CFG, f"model.hf_path={model}",
                          "data.task=jsonl", f"data.train_path={data}", "data.bad_rows=error",
                          f"logging.output_dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [f"data error: {data}:3: bad JSON (Expecting ':' delimiter at column 27)"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "run" / "actors.json").exists()  # nothing started

"""Config: YAML + dotted overrides onto the dataclasses, docs on every field, validation errors."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_tppo import config as C
from megatron_tppo import config_io as IO

ROOT = Path(__file__).resolve().parents[2]


def _all_sections(cls=C.TPPOConfig):
    yield cls
    for f in dataclasses.fields(cls):
        tp = IO._hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _all_sections(tp)


def test_every_field_has_a_docstring():
    for cls in _all_sections():
        docs = IO.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_defaults_validate():
    C.TPPOConfig().validate()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"steps": 7, "rollout": {"window_tokens": 32, "max_response_tokens": 96},
                                 "parallel": {"policy": {"tensor_parallel": 2}},
                                 "optim": {"critic": {"lr": 3e-6}}, "model": {"hf_path": "/x"}}))
    cfg = IO.load_config(p, ["rollout.num_slots=16", "rollout.colocate=false", "model.fp8=null",
                            "optim.policy.lr=5e-7", "data.template=Q: {prompt}\nA:", "model.hf_path=none"])
    assert cfg.steps == 7 and cfg.rollout.window_tokens == 32 and cfg.rollout.num_slots == 16
    assert cfg.parallel.policy.tensor_parallel == 2 and cfg.parallel.critic.tensor_parallel == 1
    assert cfg.optim.critic.lr == 3e-6 and cfg.optim.policy.lr == 5e-7
    assert cfg.rollout.colocate is False and cfg.model.fp8 is None and cfg.model.hf_path is None
    assert cfg.data.template == "Q: {prompt}\nA:"
    assert cfg.max_windows == 3 and not cfg.is_ppo_baseline
    # the dump loads back to the same config
    p2 = tmp_path / "dump.yaml"
    p2.write_text(IO.dump_yaml(cfg))
    assert IO.load_config(p2) == cfg


def test_int_accepts_integral_float_and_float_accepts_int():
    cfg = IO.load_config(None, ["rollout.window_tokens=64.0", "optim.policy.lr=1"])
    assert cfg.rollout.window_tokens == 64 and isinstance(cfg.optim.policy.lr, float)


@pytest.mark.parametrize("override,expect", [
    ("rollout.windw_tokens=3", "did you mean 'rollout.window_tokens'"),
    ("rolout.num_slots=3", "did you mean 'rollout.num_slots'"),
    ("parallel.policy.tensor_paralel=2", "did you mean 'parallel.policy.tensor_parallel'"),
    ("algorithm.clip_hihg=0.3", "did you mean 'algorithm.clip_high'"),
    ("totally_unrelated_zzz=1", "unknown config key 'totally_unrelated_zzz'"),
])
def test_typos_name_the_nearest_key(override, expect):
    with pytest.raises(C.ConfigError, match=expect):
        IO.load_config(None, [override])


@pytest.mark.parametrize("override,field", [
    ("rollout.window_tokens=abc", "rollout.window_tokens: expected an int"),
    ("rollout.window_tokens=1.5", "rollout.window_tokens: expected an int"),
    ("algorithm.dynamic_sampling=maybe", "algorithm.dynamic_sampling: expected a bool"),
    ("model.arch=gpt2", "model.arch: 'gpt2' is not one of"),
    ("rollout.window_tokens=0", "rollout.window_tokens: must be >= 1"),
    ("algorithm.gamma=1.5", "algorithm.gamma"),
    ("model.num_query_groups=3", "model.num_query_groups"),
    ("parallel.policy.tensor_parallel=3", "parallel.policy.tensor_parallel"),
    ("parallel.critic.pipeline_parallel=3", "parallel.critic.pipeline_parallel"),
    ("algorithm.truncated_tail_ignore=64", "algorithm.truncated_tail_ignore"),
    ("data.template=no placeholder", "data.template"),
    ("data.task=jsonl", "data.train_path: required"),
    ("rollout.window_tokens", "must look like key.sub=value"),
    ("data.reward=not a path", "data.reward: must be auto, arith, math or 'module:function'"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(C.ConfigError, match=field.replace("(", r"\(")):
        IO.load_config(None, [override])


def test_fp8_on_cpu_is_a_config_error():
    with pytest.raises(C.ConfigError, match="model.fp8"):
        IO.load_config(None, ["model.fp8=e4m3", "model.params_dtype=bf16", "parallel.device=cpu"])


def test_several_errors_are_reported_together():
    with pytest.raises(C.ConfigError) as err:
        IO.load_config(None, ["rollout.num_slots=0", "algorithm.clip_low=2"])
    assert "rollout.num_slots" in str(err.value) and "algorithm.clip_low" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        IO.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        IO.load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        IO.load_config(lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("rollout:\n  num_slot: 4\n")
    with pytest.raises(C.ConfigError, match=r"typo.yaml: unknown config key 'rollout.num_slot'; did you mean 'rollout.num_slots'"):
        IO.load_config(typo)


def test_example_configs_are_valid():
    files = sorted((ROOT / "examples").rglob("*.yaml"))
    assert files, "examples/ holds no YAML config"
    for f in files:
        IO.load_config(f)


def test_help_lists_every_key_with_its_doc():
    text = IO.help_text()
    for key, (_, doc) in IO.flat_fields().items():
        assert key in text and doc in text


def test_validation_imports_nothing_heavy():
    code = ("import sys; from megatron_tppo.config_io import load_config; load_config(None, ['steps=1']);"
            "bad=[m for m in ('megatron','vllm','ray','transformers') if m in sys.modules]; print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_unknown_refill_mode_is_a_config_error():
    """rollout.refill: window and continuous are implemented; anything else is refused, from the
    command line and from code, never silently treated as window."""
    with pytest.raises(C.ConfigError, match="rollout.refill: 'sometimes' is not one of"):
        IO.load_config(None, ["rollout.refill=sometimes"])
    cfg = IO.load_config(None, ["rollout.refill=continuous"])
    assert cfg.rollout.refill == "continuous"
    cfg.rollout.refill = "sometimes"
    with pytest.raises(C.ConfigError, match="rollout.refill: must be window or continuous"):
        cfg.validate()


PPO_SHAPE = ["rollout.window_tokens=256", "rollout.max_response_tokens=256", "rollout.num_slots=64",
             "rollout.samples_per_prompt=8"]


@pytest.mark.parametrize("extra,why", [
    (["rollout.window_tokens=64", "rollout.max_response_tokens=256"], r"rollout.window_tokens \(64\) >= rollout.max_response_tokens \(256\)"),
    (["rollout.refill=continuous"], r"rollout.refill window \(got continuous\)"),
    (["rollout.num_slots=60"], r"rollout.num_slots \(60\) a multiple of rollout.samples_per_prompt \(8\)"),
])
def test_dynamic_sampling_is_refused_where_a_group_spans_steps(extra, why):
    with pytest.raises(C.ConfigError, match="algorithm.dynamic_sampling: needs every group generated and trained "
                                            "in one step") as err:
        IO.load_config(None, PPO_SHAPE + ["algorithm.dynamic_sampling=true"] + extra)
    assert re.search(why, str(err.value)), str(err.value)


def test_dynamic_sampling_validates_for_ppo():
    cfg = IO.load_config(None, PPO_SHAPE + ["algorithm.dynamic_sampling=true"])
    assert cfg.is_ppo_baseline and cfg.algorithm.dynamic_sampling
    IO.load_config(None, ["rollout.window_tokens=64", "rollout.max_response_tokens=256"])  # T-PPO without it


def test_top_p_below_one_needs_raw_logprobs():
    with pytest.raises(C.ConfigError, match="rollout.top_p: 0.9 < 1 with rollout.logprobs_mode=processed"):
        IO.load_config(None, ["rollout.top_p=0.9"])
    raw = IO.load_config(None, ["rollout.top_p=0.9", "rollout.logprobs_mode=raw", "rollout.temperature=0.7"])
    assert raw.rollout.logprob_temperature() == 1.0  # the raw log-probs are the temperature-1 model's


def test_trainer_scores_at_the_behaviour_logprob_temperature():
    assert IO.load_config(None, ["rollout.temperature=0.7"]).rollout.logprob_temperature() == 0.7
    assert IO.load_config(None, []).rollout.logprob_temperature() == 1.0

"""Every config key does something: it is read by the running system, or setting it to anything but
its default is a configuration error that names it (a key that is validated and then ignored
would let a user believe a setting is in effect). Plus the keys added for long runs and FP8."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from megatron_tppo import config as C
from megatron_tppo import config_io as IO

ROOT = Path(__file__).resolve().parents[2]
# keys the schema keeps for a feature that does not exist yet: a non-default value is refused
NOT_IMPLEMENTED = {"algorithm.kl_coef": "0.05"}
# keys the rest of the code reads through a property of the config
READ_VIA = {"model.make_vocab_size_divisible_by": "padded_vocab_size"}
# 32B-shaped FP8 model (examples/qwen2.5_32b/tppo_fp8.yaml) on 8-way tensor parallelism
FP8_32B = ["parallel.device=cuda", "model.params_dtype=bf16", "model.fp8=hybrid", "model.hidden_size=5120",
           "model.ffn_hidden_size=27648", "model.num_attention_heads=40", "model.num_query_groups=8",
           "model.vocab_size=152064", "parallel.policy.tensor_parallel=8", "parallel.critic.tensor_parallel=8"]


def _source() -> str:
    skip = {"config.py", "config_io.py"}
    return "\n".join(p.read_text() for p in (ROOT / "megatron_tppo").rglob("*.py") if p.name not in skip)


def test_every_key_is_read_or_refused():
    src = _source()
    def read(key: str) -> bool:
        name = READ_VIA.get(key, key.rsplit(".", 1)[-1])
        return re.search(rf"\.{re.escape(name)}\b", src) is not None

    unread = [key for key in IO.flat_fields() if not read(key)]
    assert sorted(unread) == sorted(NOT_IMPLEMENTED), f"config keys nothing reads: {unread}"
    for key, value in NOT_IMPLEMENTED.items():
        with pytest.raises(C.ConfigError, match=re.escape(key)):
            IO.load_config(None, [f"{key}={value}"])


def test_kl_coef_is_refused_until_a_reference_model_exists():
    IO.load_config(None, ["algorithm.kl_coef=0"])
    with pytest.raises(C.ConfigError, match="algorithm.kl_coef: a KL penalty to a reference policy is not implemented"):
        IO.load_config(None, ["algorithm.kl_coef=0.01"])


def test_save_every_s_is_validated():
    assert IO.load_config(None, []).checkpoint.save_every_s == 0.0
    assert IO.load_config(None, ["checkpoint.save_every_s=3600"]).checkpoint.save_every_s == 3600.0
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(C.ConfigError, match="checkpoint.save_every_s"):
            IO.load_config(None, [f"checkpoint.save_every_s={bad}"])


def test_fp8_widths_fit_the_32b_layout():
    cfg = IO.load_config(None, FP8_32B)
    assert cfg.model.fp8 == "hybrid"
    IO.load_config(None, FP8_32B + ["model.fp8_recipe=mxfp8"])  # 3456 per rank is a multiple of 32 too


@pytest.mark.parametrize("extra,what", [
    (["model.ffn_hidden_size=27656"], "model.ffn_hidden_size per tensor-parallel rank of the policy"),
    (["model.hidden_size=5128", "model.num_attention_heads=8", "model.num_query_groups=8"],
     "model.hidden_size=5128 must be a multiple of 16"),
    (["model.ffn_hidden_size=27776", "model.fp8_recipe=mxfp8"], "is 3472, not a multiple of 32"),
])
def test_fp8_widths_that_te_cannot_run_are_refused(extra, what):
    with pytest.raises(C.ConfigError, match=re.escape(what)):
        IO.load_config(None, FP8_32B + extra)


def test_without_fp8_any_width_goes():
    IO.load_config(None, ["model.ffn_hidden_size=700", "model.hidden_size=260", "model.num_attention_heads=4",
                          "model.num_query_groups=2"])


def test_docs_say_what_happens():
    docs = {key: doc for key, (_, doc) in IO.flat_fields().items()}
    assert "not implemented" in docs["algorithm.kl_coef"].lower()
    assert "perf/checkpoint_s" in docs["checkpoint.save_every_s"]
    assert "None builds" not in docs["model.hf_path"]
    assert dataclasses.fields(C.CheckpointConfig)  # the section is still a dataclass

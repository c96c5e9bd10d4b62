"""A trainer built without its random initialization (``init_weights=False``, what the run's
trainers do: a load always follows) equals one built with it, once either is loaded.

Real gloo processes at TP=2 and PP=2 (tests/distributed/_skip_init_job.py), tied and untied
models, policy and critic, fp32 and bf16; loaded from an HF model or from a torch_dist
checkpoint. Bit-exact: the parameters after the load and after one optimizer step (the bf16
optimizer's fp32 main copies must follow the load too).
"""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.weights.hf_config import random_hf_model
from tests.weights.common import MODELS

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(500)]

CASES = [f"{layout}/{model}/{role}" for layout in ("tp2", "pp2")
         for model in (*MODELS, "qwen_tied_gqa_bf16") for role in ("policy", "critic")]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_jobs):
    hf_root = tmp_path_factory.mktemp("hf")
    for key, m in MODELS.items():
        random_hf_model(m, seed=5).save_pretrained(hf_root / key, safe_serialization=True)
    out = run_jobs([("skip_init", "tests.distributed._skip_init_job", [str(hf_root)], 2)], timeout_s=450)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_skipped_init_then_load_equals_init_then_load(results, case):
    for rank in results:
        r = rank[case]
        # the init really was skipped: every weight megatron initializes with a random draw is
        # NaN (norm weights are ones and biases zeros in megatron's constructors; the critic's
        # value head draws its own, tiny)
        drawn = [n for n in r["names"] if n.endswith("weight") and "norm" not in n and not
                 (case.endswith("critic") and n.startswith("output_layer."))]
        assert drawn and set(drawn) <= set(r["nan_before"]), (drawn, r["nan_before"])
        assert r["skip_vs_ref"] == [], r["skip_vs_ref"]   # HF load: every parameter, bit-exact
        assert r["ckpt_vs_ref"] == [], r["ckpt_vs_ref"]   # checkpoint load: the same
        # one optimizer step from each: same loss, same parameters (main copies followed the load)
        assert r["step_skip"] == r["step_ref"] == r["step_ckpt"]
        assert r["step_skip_vs_ref"] == [] and r["step_ckpt_vs_ref"] == []

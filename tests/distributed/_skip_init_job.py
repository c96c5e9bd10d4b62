"""One rank of the skipped-initialization job: ``python -m tests.distributed._skip_init_job <hf_root> <out_dir>``.

World 2: TP=2, then PP=2 (parallel_state rebuilt in between). For each model of
tests.weights.common (tied Qwen2, untied Llama; + the tied one in bf16) and role (policy, critic):

- ``ref``: built with the random initialization, then loaded from the HF model;
- ``skip``: built with ``init_weights=False`` (which parameters are NaN before the load is recorded),
  then loaded from the same HF model;
- ``ckpt``: built with ``init_weights=False``, then loaded from a torch_dist checkpoint of ``ref``;

and one optimizer step of the same batch on each. Every comparison is of this rank's own shards
(bit-exact). Writes ``<out_dir>/rank<r>.pt``: {"<layout>/<model>/<role>": {...}}.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist

from megatron_tppo.config import LayoutConfig, OptimizerConfig
from megatron_tppo.training import TrainEngine, init_parallel
from megatron_tppo.weights.hf_io import load_hf_into
from tests.weights.common import MODELS, SEED, batch

CASES = {**MODELS, "qwen_tied_gqa_bf16": dataclasses.replace(MODELS["qwen_tied_gqa"], params_dtype="bf16")}
OPTIM = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)


def train_batch(m) -> dict:
    b = batch(m)
    g = torch.Generator().manual_seed(3)
    mask = b["attention_mask"].clone()
    mask[:, :4] = 0
    return {**b, "loss_mask": mask, "advantages": torch.randn(mask.shape, generator=g),
            "returns": torch.randn(mask.shape, generator=g)}


def loss_fn(outs, mb, n):
    m = mb["loss_mask"]
    if "values" in outs:
        return 0.5 * (((outs["values"] - mb["returns"]) ** 2) * m).sum() / n, {}
    return -(outs["logprobs"] * mb["advantages"] * m).sum() / n, {}


def params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def mismatches(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bit-identical (NaN never equals NaN: a missed weight shows)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return [n for n in a if not torch.equal(a[n], b[n])]


def run_case(layout: LayoutConfig, m, hf_dir: str, role: str, ckpt_dir: str) -> dict:
    skip_head = ("output_layer.",) if role == "critic" else ()

    def build(init_weights: bool) -> TrainEngine:
        return TrainEngine(m, layout, OPTIM, role=role, device="cpu", seed=SEED, total_steps=4,
                           init_weights=init_weights)

    ref = build(True)
    load_hf_into(ref.module, hf_dir, m, skip_prefixes=skip_head)
    ref.weights_changed()
    ref.save(ckpt_dir, with_optimizer=False)

    skip = build(False)
    before = params(skip)
    load_hf_into(skip.module, hf_dir, m, skip_prefixes=skip_head)
    skip.weights_changed()

    ckpt = build(False)
    ckpt.load(ckpt_dir, with_optimizer=False)

    res = {"names": sorted(before), "nan_before": sorted(n for n, t in before.items() if torch.isnan(t).any()),
           "skip_vs_ref": mismatches(params(skip), params(ref)),
           "ckpt_vs_ref": mismatches(params(ckpt), params(ref))}
    tb = train_batch(m)
    n_tokens = float(tb["loss_mask"].sum())
    for name, eng in (("ref", ref), ("skip", skip), ("ckpt", ckpt)):
        res[f"step_{name}"] = eng.train_step(tb, loss_fn, n_tokens)
        res[f"after_{name}"] = params(eng)
    res["step_skip_vs_ref"] = mismatches(res.pop("after_skip"), res["after_ref"])
    res["step_ckpt_vs_ref"] = mismatches(res.pop("after_ckpt"), res.pop("after_ref"))
    return res


def main(hf_root: str, out: str) -> None:
    res = {}
    for tag, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        info = init_parallel(tp, pp, "cpu")
        layout = LayoutConfig(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=info.dp)
        for key, m in CASES.items():
            hf_dir = f"{hf_root}/{key.removesuffix('_bf16')}"
            for role in ("policy", "critic"):
                res[f"{tag}/{key}/{role}"] = run_case(layout, m, hf_dir, role, f"{out}/ckpt_{tag}_{key}_{role}")
    torch.save(res, f"{out}/rank{dist.get_rank()}.pt")
    from megatron_tppo.training import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""One rank of a parity job: ``python -m tests.distributed._worker <job> <out_dir>``.

Jobs (the parent sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT):

- ``ref``    world 1: the TP=1/PP=1/DP=1 reference, one micro-batch per step.
- ``layouts`` world 2: TP=2, then PP=2, then DP=2 (distributed optimizer), then TP=2 resuming
  the DP=2 checkpoint, in the same processes (parallel_state is rebuilt between layouts), small
  micro-batches so several run per step.

Each rank writes ``<out_dir>/<job>_rank<r>.pt``: {section: {name: tensor or float}}. Parameters
are written in the TP=1 layout under global names (TP shards gathered, layer numbers globalized),
one pipeline stage's subset per rank; the parent merges stages.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
from megatron_tppo.weights.gather import iter_full_params
from megatron_tppo.training import (
    TrainEngine,
    copy_backbone_into,
    init_parallel,
    load_backbone,
    split_for_data_parallel,
)

SEED = 1234
MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=250, make_vocab_size_divisible_by=128,
                    max_position_embeddings=64, rope_theta=10000.0, qkv_bias=True, tie_word_embeddings=True)
UNTIED = dataclasses.replace(MODEL, tie_word_embeddings=False, qkv_bias=False)
OPTIM = OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0)
SMALL_MICRO = 64  # tokens per micro-batch in the 2-rank layouts: several micro-batches per step
BIG_MICRO = 4096  # the reference takes the whole batch in one micro-batch


def make_batch() -> dict:
    """6 rows, T=32, lengths 9..32, loss on the tokens after a 5-token 'prompt'."""
    g = torch.Generator().manual_seed(7)
    b, t = 6, 32
    lengths = [32, 12, 25, 9, 30, 17]
    tokens = torch.randint(0, MODEL.vocab_size, (b, t), generator=g)
    attn = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    loss_mask = attn.clone()
    loss_mask[:, :5] = 0
    return {"tokens": tokens * attn.long(), "attention_mask": attn, "loss_mask": loss_mask,
            "advantages": torch.randn(b, t, generator=g), "returns": torch.randn(b, t, generator=g)}


def policy_loss(outs, mb, n):
    """-sum(logp * A) - 0.01 * sum(entropy) over loss tokens, / global count."""
    m = mb["loss_mask"]
    loss = (-(outs["logprobs"] * mb["advantages"]) - 0.01 * outs["entropy"]) * m
    return loss.sum() / n, {"entropy": (outs["entropy"] * m).sum() / n, "tokens": m.sum()}


def critic_loss(outs, mb, n):
    """0.5 * sum((V - R)^2) over loss tokens / global count."""
    m = mb["loss_mask"]
    return 0.5 * (((outs["values"] - mb["returns"]) ** 2) * m).sum() / n, {}


def optimizer_kinds(engine) -> list[str]:
    """Class names of the Megatron optimizers behind the engine (chained or single)."""
    opt = engine.optimizer
    return [type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])]


def full_params(engine) -> dict[str, torch.Tensor]:
    """This stage's parameters in the TP=1 layout with global layer numbers (a tied copy skipped)."""
    return {k: v.float() for k, v in iter_full_params(engine.module, engine.tp_group)}


def run_layout(tag: str, tp: int, pp: int, micro: int, res: dict, ckpt_root: str) -> None:
    info = init_parallel(tp, pp, "cpu")
    layout = LayoutConfig(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=info.dp,
                          micro_batch_tokens=micro)
    batch = make_batch()
    n = float(batch["loss_mask"].sum())
    local = split_for_data_parallel(batch, info.dp, info.dp_rank)
    r: dict = {}

    policy = TrainEngine(MODEL, layout, OPTIM, role="policy", device="cpu", seed=SEED, total_steps=10)
    if info.dp == 1:
        out = policy.forward(batch, with_entropy=True)
        r["logprobs"], r["entropy"] = out["logprobs"], out["entropy"]
    m1 = policy.train_step(local, policy_loss, n, with_entropy=True)
    r["policy_loss"], r["policy_entropy"], r["policy_tokens"] = m1["loss"], m1["entropy"], m1["tokens"]
    r["policy_grad_norm"], r["policy_micro"] = m1["grad_norm"], m1["num_micro_batches"]
    r["policy_params"] = full_params(policy)
    r["optimizer_kinds"] = optimizer_kinds(policy)
    if info.dp == 1:
        r["logprobs_step1"] = policy.forward(batch)["logprobs"]
        untied = TrainEngine(UNTIED, layout, OPTIM, role="policy", device="cpu", seed=SEED, with_optimizer=False)
        r["untied_logprobs"] = untied.forward(batch)["logprobs"]

    critic = TrainEngine(MODEL, layout, OPTIM, role="critic", device="cpu", seed=SEED, total_steps=10)
    if info.dp == 1:
        r["values"] = critic.forward(batch)["values"]
    c1 = critic.train_step(local, critic_loss, n)
    r["critic_loss"], r["critic_grad_norm"] = c1["loss"], c1["grad_norm"]
    r["critic_params"] = full_params(critic)

    if tag in ("tp2", "dp2"):  # loaded later at another layout (pp2, tp2_from_dp2)
        policy.save(os.path.join(ckpt_root, f"policy_{tag}"))
    if tag == "pp2":
        fresh = TrainEngine(MODEL, layout, OPTIM, role="policy", device="cpu", seed=SEED + 1, total_steps=10)
        fresh.load(os.path.join(ckpt_root, "policy_tp2"))
        r["ckpt_logprobs"] = fresh.forward(batch)["logprobs"]
        m2 = fresh.train_step(local, policy_loss, n, with_entropy=True)  # uses the loaded Adam state
        r["ckpt_step2_loss"] = m2["loss"]
        r["ckpt_step2_params"] = full_params(fresh)
        bb = TrainEngine(MODEL, layout, OPTIM, role="critic", device="cpu", seed=SEED + 2, total_steps=10)
        load_backbone(bb, os.path.join(ckpt_root, "policy_tp2"))
        r["backbone_values"] = bb.forward(batch)["values"]
    res[tag] = r


def run_resume_from_dp2(res: dict, ckpt_root: str) -> None:
    """TP=2 resumes the DP=2 (distributed optimizer) checkpoint and takes the second step."""
    init_parallel(2, 1, "cpu")
    layout = LayoutConfig(tensor_parallel=2, micro_batch_tokens=SMALL_MICRO)
    batch = make_batch()
    n = float(batch["loss_mask"].sum())
    policy = TrainEngine(MODEL, layout, OPTIM, role="policy", device="cpu", seed=SEED + 3, total_steps=10)
    policy.load(os.path.join(ckpt_root, "policy_dp2"))
    m2 = policy.train_step(batch, policy_loss, n, with_entropy=True)
    res["tp2_from_dp2"] = {"step2_loss": m2["loss"], "step2_params": full_params(policy),
                           "steps": policy.steps, "lr": m2["lr"]}


def run_reference(res: dict, ckpt_root: str) -> None:
    init_parallel(1, 1, "cpu")
    layout = LayoutConfig(micro_batch_tokens=BIG_MICRO)
    batch = make_batch()
    n = float(batch["loss_mask"].sum())
    r: dict = {}
    policy = TrainEngine(MODEL, layout, OPTIM, role="policy", device="cpu", seed=SEED, total_steps=10)
    out = policy.forward(batch, with_entropy=True)
    r["logprobs"], r["entropy"] = out["logprobs"], out["entropy"]
    m1 = policy.train_step(batch, policy_loss, n, with_entropy=True)
    r["policy_loss"], r["policy_entropy"], r["policy_tokens"] = m1["loss"], m1["entropy"], m1["tokens"]
    r["policy_grad_norm"], r["policy_micro"] = m1["grad_norm"], m1["num_micro_batches"]
    r["policy_params"] = full_params(policy)
    r["optimizer_kinds"] = optimizer_kinds(policy)
    r["logprobs_step1"] = policy.forward(batch)["logprobs"]
    untied = TrainEngine(UNTIED, layout, OPTIM, role="policy", device="cpu", seed=SEED, with_optimizer=False)
    r["untied_logprobs"] = untied.forward(batch)["logprobs"]

    critic = TrainEngine(MODEL, layout, OPTIM, role="critic", device="cpu", seed=SEED, total_steps=10)
    r["values"] = critic.forward(batch)["values"]
    c1 = critic.train_step(batch, critic_loss, n)
    r["critic_loss"], r["critic_grad_norm"] = c1["loss"], c1["grad_norm"]
    r["critic_params"] = full_params(critic)

    bb = TrainEngine(MODEL, layout, OPTIM, role="critic", device="cpu", seed=SEED + 2, total_steps=10)
    copy_backbone_into(bb, policy)
    r["backbone_values"] = bb.forward(batch)["values"]

    m2 = policy.train_step(batch, policy_loss, n, with_entropy=True)
    r["step2_loss"], r["step2_lr"] = m2["loss"], m2["lr"]
    r["step2_params"] = full_params(policy)
    res["ref"] = r


def main() -> None:
    job, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    res: dict = {}
    if job == "ref":
        run_reference(res, out_dir)
    elif job == "layouts":
        run_layout("tp2", 2, 1, SMALL_MICRO, res, out_dir)
        run_layout("pp2", 1, 2, SMALL_MICRO, res, out_dir)
        run_layout("dp2", 1, 1, SMALL_MICRO, res, out_dir)
        run_resume_from_dp2(res, out_dir)
    else:
        raise SystemExit(f"unknown job {job!r}")
    torch.save(res, os.path.join(out_dir, f"{job}_rank{dist.get_rank()}.pt"))
    dist.barrier()
    from megatron_tppo.training import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()

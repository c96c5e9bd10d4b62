"""One process: the engine with FP8-style padding (widths rounded up to 16, past the batch width)
against the same engine without it. ``python -m tests.distributed._padding_job <out_dir>``.

Padding carries no attention and no loss, so forward outputs, losses, gradient norms and the
updated parameters must agree (fp32, summation-order noise only). Writes padding_rank0.pt.
"""
from __future__ import annotations

import os
import sys

import torch

from megatron_tppo.config import LayoutConfig
from megatron_tppo.training import TrainEngine, init_parallel
from tests.distributed._worker import MODEL, OPTIM, SEED, critic_loss, full_params, policy_loss

WIDTH = 37  # no multiple of 16: the longest rows need columns the batch does not have


def make_batch() -> dict:
    g = torch.Generator().manual_seed(11)
    lengths = [37, 12, 25, 9, 30, 17]
    b = len(lengths)
    attn = (torch.arange(WIDTH)[None] < torch.tensor(lengths)[:, None]).float()
    loss_mask = attn.clone()
    loss_mask[:, :5] = 0
    return {"tokens": torch.randint(0, MODEL.vocab_size, (b, WIDTH), generator=g) * attn.long(),
            "attention_mask": attn, "loss_mask": loss_mask,
            "advantages": torch.randn(b, WIDTH, generator=g), "returns": torch.randn(b, WIDTH, generator=g)}


def run(pad: int) -> dict:
    layout = LayoutConfig(micro_batch_tokens=96)  # several micro-batches per step
    batch = make_batch()
    n = float(batch["loss_mask"].sum())
    r: dict = {}
    policy = TrainEngine(MODEL, layout, OPTIM, role="policy", device="cpu", seed=SEED, total_steps=4,
                         pad_to_multiple=pad)
    r["widths"] = [mb["tokens"].shape[1] for mb in policy._micro_batches(batch)[1]]
    out = policy.forward(batch, with_entropy=True)
    r["logprobs"], r["entropy"] = out["logprobs"], out["entropy"]
    m = policy.train_step(batch, policy_loss, n, with_entropy=True)
    r["policy_loss"], r["policy_grad_norm"] = m["loss"], m["grad_norm"]
    r["policy_params"] = full_params(policy)
    critic = TrainEngine(MODEL, layout, OPTIM, role="critic", device="cpu", seed=SEED, total_steps=4,
                         pad_to_multiple=pad)
    r["values"] = critic.forward(batch)["values"]
    c = critic.train_step(batch, critic_loss, n)
    r["critic_loss"], r["critic_grad_norm"] = c["loss"], c["grad_norm"]
    return r


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    init_parallel(1, 1, "cpu")
    res = {"tight": run(1), "padded": run(16)}
    torch.save(res, os.path.join(out_dir, "padding_rank0.pt"))
    from megatron_tppo.training import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()

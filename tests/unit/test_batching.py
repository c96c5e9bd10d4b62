"""Micro-batch shapes (pure torch): widths and token counts are multiples of the FP8 alignment,
padding past the batch width is zeros, and the real tokens are untouched."""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.training.batching import fp8_alignment, plan_micro_batches, select_rows, split_micro_batches


def _batch(lengths: list[int], width: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    attn = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    tokens = torch.randint(1, 100, (b, width), generator=g) * attn.long()
    loss_mask = attn.clone()
    loss_mask[:, :2] = 0
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask,
            "advantages": torch.randn(b, width, generator=g), "reward": torch.randn(b, generator=g)}


def test_fp8_alignment_follows_the_recipe():
    assert fp8_alignment(None) == 1
    assert fp8_alignment(None, "mxfp8") == 1
    for recipe in ("delayed", "tensorwise", "blockwise"):
        assert fp8_alignment("e4m3", recipe) == 16 and fp8_alignment("hybrid", recipe) == 16
    assert fp8_alignment("hybrid", "mxfp8") == 32
    m = ModelConfig(fp8="hybrid", fp8_recipe="delayed", params_dtype="bf16")
    assert fp8_alignment(m.fp8, m.fp8_recipe) == 16


@pytest.mark.parametrize("multiple", [16, 32])
@pytest.mark.parametrize("budget", [64, 200, 1000])
def test_widths_and_token_counts_are_multiples(multiple, budget):
    g = torch.Generator().manual_seed(budget + multiple)
    lengths = torch.randint(0, 90, (40,), generator=g)
    lengths[0] = 0  # an empty row still gets a whole multiple
    plan = plan_micro_batches(lengths, budget, multiple)
    assert sorted(torch.cat(plan.rows).tolist()) == list(range(40))
    for rows, w in zip(plan.rows, plan.widths):
        assert w >= multiple and w % multiple == 0
        assert (len(rows) * w) % multiple == 0
        longest = int(lengths[rows].max())
        assert w == max(1, -(-longest // multiple)) * multiple  # the longest row, rounded up
        assert len(rows) == 1 or len(rows) * w <= budget


def test_no_alignment_keeps_micro_batches_tight():
    plan = plan_micro_batches(torch.tensor([7, 3, 5]), 100, 1)
    assert plan.widths == [7]


@pytest.mark.parametrize("multiple", [1, 16, 32])
def test_micro_batches_are_padded_past_the_batch_width(multiple):
    # T = 37 is no multiple of 16: the longest rows need columns the batch does not have
    lengths = [37, 37, 30, 20, 17, 9, 3]
    batch = _batch(lengths, 37)
    rows, mbs = split_micro_batches(batch, 80, multiple)
    seen = []
    for r, mb in zip(rows, mbs):
        b, w = mb["tokens"].shape
        assert w % multiple == 0 and (b * w) % multiple == 0
        assert w >= max(lengths[i] for i in r.tolist())
        for key in ("tokens", "attention_mask", "loss_mask", "advantages"):
            assert mb[key].shape == (b, w)
            keep = min(w, 37)
            assert torch.equal(mb[key][:, :keep], batch[key][r, :keep])
            assert not mb[key][:, keep:].any()  # zero padding: no attention, no loss
        assert torch.equal(mb["reward"], batch["reward"][r])  # per-row fields are not padded
        seen += r.tolist()
    assert sorted(seen) == list(range(len(lengths)))


def test_select_rows_pads_and_cuts():
    batch = _batch([5, 3], 6)
    wide = select_rows(batch, torch.tensor([1, 0]), 16)
    assert wide["tokens"].shape == (2, 16) and torch.equal(wide["tokens"][:, :6], batch["tokens"][[1, 0]])
    assert wide["tokens"].dtype == batch["tokens"].dtype
    narrow = select_rows(batch, torch.tensor([0]), 4)
    assert narrow["loss_mask"].shape == (1, 4)
    same = select_rows(batch, torch.tensor([0, 1]))
    assert all(torch.equal(same[k], batch[k]) for k in batch)


def test_bad_multiple_is_refused():
    with pytest.raises(ValueError, match="pad_to_multiple"):
        plan_micro_batches(torch.tensor([3]), 10, 0)

"""Batch layout: data-parallel shards and length-sorted micro-batches (pure torch, no megatron).

A batch is a plain dict of tensors whose first dimension is the row (sequence) index:
``tokens`` [B, T] long (right padded), optional ``attention_mask`` [B, T] (1 = real token; rows
without it count as full length), ``loss_mask`` [B, T], and any other per-token [B, T, ...] or
per-row [B] fields. Rows are cut to the micro-batch's longest row, so padding beyond it costs
nothing; causal attention makes tokens after a row's end irrelevant to the tokens before it.

Micro-batches: rows sorted by length (longest first) are packed greedily while
``rows * longest_row <= micro_batch_tokens`` (a row longer than the budget gets a micro-batch of its
own). Each micro-batch is cut to its own longest row, rounded up to ``pad_to_multiple``; when that
is wider than the batch, its per-token fields are right-padded with zeros (zero loss and attention
masks), so every width is a multiple, and so is every micro-batch's token count.

FP8 (:func:`fp8_alignment`): Transformer Engine checks each FP8 GEMM operand
(``assert_dim_for_fp8_exec`` in transformer_engine/pytorch/utils.py): the product of the leading
dims (the tokens) must be divisible by 8 and the last dim by 16. In the weight-gradient GEMM the
tokens are the inner dimension, so the token count needs 16. MXFP8 scales blocks of 32 along both
dims (``MXFP8Quantizer.is_quantizable`` in transformer_engine/pytorch/tensor/mxfp8_tensor.py).
megatron-core pads to the same numbers (``get_fp8_align_size`` in megatron/core/fp8_utils.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def row_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] long: real tokens per row (attention_mask sum, else the full width T)."""
    tokens = batch["tokens"]
    if "attention_mask" in batch:
        return batch["attention_mask"].to(torch.long).sum(-1)
    return torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)


def fp8_alignment(fp8: str | None, fp8_recipe: str = "delayed") -> int:
    """The multiple that sequence widths (and so micro-batch token counts) are padded to.

    ``fp8``, ``fp8_recipe``: ModelConfig's. 1 without FP8, 32 for the mxfp8 recipe, else 16 (the
    module docstring says where these numbers come from).
    """
    if fp8 is None:
        return 1
    return 32 if fp8_recipe == "mxfp8" else 16


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor, width: int | None = None) -> dict:
    """Rows ``rows`` of every field; per-token fields ([B, T, ...]) cut to ``width`` columns, or
    right-padded with zeros up to ``width`` when it is wider than T."""
    t = batch["tokens"].shape[1]
    out = {}
    for key, value in batch.items():
        v = value.index_select(0, rows.to(value.device))
        if width is not None and v.dim() >= 2 and v.shape[1] == t:
            if width <= t:
                v = v[:, :width]
            else:
                v = torch.cat([v, v.new_zeros((v.shape[0], width - t, *v.shape[2:]))], dim=1)
        out[key] = v
    return out


@dataclass
class MicroBatchPlan:
    """Row indices (into the batch) and the padded width of each micro-batch."""

    rows: list[torch.Tensor]
    widths: list[int]

    @property
    def padded_tokens(self) -> int:
        return sum(len(r) * w for r, w in zip(self.rows, self.widths))


def plan_micro_batches(lengths: torch.Tensor, micro_batch_tokens: int, pad_to_multiple: int = 1,
                       sort: bool = True) -> MicroBatchPlan:
    """Group rows into micro-batches of at most ``micro_batch_tokens`` padded tokens.

    lengths: [B] real tokens per row. Every width is a positive multiple of ``pad_to_multiple``
    (:func:`fp8_alignment`). With ``sort=False`` rows keep their order (the naive layout the
    benchmark compares against).
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    order = torch.argsort(lengths, descending=True, stable=True) if sort else torch.arange(len(lengths))
    rows: list[list[int]] = []
    widths: list[int] = []

    def rounded(n: int) -> int:  # an empty row still takes one multiple
        return max(1, -(-n // pad_to_multiple)) * pad_to_multiple

    for i in order.tolist():
        w = rounded(int(lengths[i]))
        if rows:
            new_w = max(widths[-1], w)
            if (len(rows[-1]) + 1) * new_w <= micro_batch_tokens:
                rows[-1].append(i)
                widths[-1] = new_w
                continue
        rows.append([i])
        widths.append(w)
    return MicroBatchPlan([torch.tensor(r, dtype=torch.long) for r in rows], widths)


def split_micro_batches(batch: dict[str, torch.Tensor], micro_batch_tokens: int,
                        pad_to_multiple: int = 1) -> tuple[list[torch.Tensor], list[dict]]:
    """The batch as planned micro-batches: (row indices of each, the micro-batches themselves),
    each micro-batch [b, w] with w its planned width (cut, or zero-padded past T)."""
    plan = plan_micro_batches(row_lengths(batch), micro_batch_tokens, pad_to_multiple)
    return plan.rows, [select_rows(batch, r, w) for r, w in zip(plan.rows, plan.widths)]


def padding_fraction(lengths: torch.Tensor, plan: MicroBatchPlan) -> float:
    """Share of computed tokens that are padding under ``plan``."""
    padded = plan.padded_tokens
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0


def data_parallel_rows(lengths: torch.Tensor, dp_size: int, equal_rows: bool = False) -> list[torch.Tensor]:
    """Row indices (ascending) of each of ``dp_size`` ranks, balancing real tokens: rows are dealt
    longest first, each to the least-loaded rank. ``equal_rows`` also caps every rank at
    ceil(B / dp_size) rows (exactly half each at DP=2), for forwards whose cost is per row as much
    as per token. A rank may get no rows when B < dp_size.

    lengths: [B] real tokens per row (:func:`row_lengths`).
    """
    cap = -(-lengths.shape[0] // dp_size) if equal_rows else lengths.shape[0]
    load = [0] * dp_size
    owned: list[list[int]] = [[] for _ in range(dp_size)]
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        r = min((k for k in range(dp_size) if len(owned[k]) < cap), key=lambda k: (load[k], len(owned[k]), k))
        owned[r].append(i)
        load[r] += int(lengths[i])
    return [torch.tensor(sorted(o), dtype=torch.long) for o in owned]


def split_for_data_parallel(batch: dict[str, torch.Tensor], dp_size: int, dp_rank: int) -> dict:
    """This DP rank's rows, balancing real tokens across ranks (:func:`data_parallel_rows`).
    Every rank of one model replica (its TP/PP ranks) must get the same rows.
    """
    lengths = row_lengths(batch)
    if lengths.shape[0] < dp_size:
        raise ValueError(f"a batch of {lengths.shape[0]} rows cannot feed {dp_size} data-parallel ranks")
    return select_rows(batch, data_parallel_rows(lengths, dp_size)[dp_rank])


def merge_row_parts(parts: list) -> dict[str, torch.Tensor]:
    """Reassemble per-replica outputs into the original row order.

    parts: one entry per replica (``None`` entries are skipped), each ``{"rows": [b] long,
    "outputs": {key: [b, T, ...]}}``, the rows of all parts together covering 0..B-1 once.
    Returns ``{key: [B, T, ...]}`` (empty when no part has rows).
    """
    parts = [p for p in parts if p is not None and len(p["rows"])]
    if not parts:
        return {}
    total = sum(len(p["rows"]) for p in parts)
    out = {}
    for key, first in parts[0]["outputs"].items():
        merged = first.new_zeros((total, *first.shape[1:]))
        for p in parts:
            merged[p["rows"]] = p["outputs"][key]
        out[key] = merged
    return out

"""Bucket layouts of a weight transfer, planned once from parameter shapes (no data touched).

A bucket is ONE flat uint8 buffer holding whole megatron modules' HF tensors (``...linear_qkv``'s
weight and bias, ``linear_fc1``'s gate and up, as :func:`megatron_tppo.weights.buckets.hf_buckets`
forms them), each at a :class:`Slot`: name, dtype, shape and a 64-byte aligned offset. Every
vLLM layer is then complete inside one bucket, and vLLM's layer-wise reload processes it before
the next bucket arrives. :func:`plan_stage` runs the real name map and the real bucketing on
``meta`` tensors of the full shapes, so a sender knows every bucket before it gathers anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from megatron_tppo.config import ModelConfig

ALIGN = 64  # byte alignment of every tensor inside a flat buffer (any dtype view, vector loads)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Slot:
    """Where one HF tensor sits in a bucket's flat byte buffer."""

    name: str
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``."""
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the flat buffer (a multiple of :data:`ALIGN`)."""

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * DTYPES[self.dtype].itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into ``flat`` (uint8)."""
        return flat[self.offset:self.offset + self.nbytes].view(DTYPES[self.dtype]).view(self.shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"cannot transfer dtype {dtype}; supported: {sorted(DTYPES)}")
    return name


def layout(pairs: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[Slot], int]:
    """(name, tensor or meta tensor) pairs -> their slots in one flat buffer and its size in bytes."""
    slots, offset = [], 0
    for name, t in pairs:
        slot = Slot(name, _dtype_name(t.dtype), tuple(int(s) for s in t.shape), offset)
        slots.append(slot)
        offset += -(-slot.nbytes // ALIGN) * ALIGN
    return slots, offset


@dataclass
class StagePlan:
    """The buckets one pipeline stage sends, planned once from parameter shapes."""

    buckets: list[list[Slot]]
    sizes: list[int]
    """Flat-buffer bytes of each bucket."""
    bucket_of: dict[str, int]
    """Megatron parameter name -> index of the bucket its HF tensors go to."""
    sources: list[int]
    """Number of megatron parameters feeding each bucket."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for b in self.buckets for s in b)


def plan_stage(specs: Sequence[tuple[str, Sequence[int], torch.dtype]], m: ModelConfig, bucket_bytes: int) -> StagePlan:
    """Bucket layout of a stage from ``(global megatron name, full shape, dtype)`` in gather order.

    Runs the real name/layout map (:func:`~megatron_tppo.weights.hf_mapping.megatron_to_hf`) and
    the real bucketing (:func:`~megatron_tppo.weights.buckets.hf_buckets`) on meta tensors, so the
    plan is what a sync of the real tensors produces, without touching any data.
    """
    from megatron_tppo.weights.buckets import hf_buckets
    from megatron_tppo.weights.hf_mapping import megatron_to_hf

    metas = [(name, torch.empty(tuple(shape), dtype=dtype, device="meta")) for name, shape, dtype in specs]
    source = {hf: name for name, t in metas for hf, _ in megatron_to_hf(name, t, m)}
    buckets, sizes, bucket_of, counts = [], [], {}, []
    for i, bucket in enumerate(hf_buckets(iter(metas), m, bucket_bytes)):
        slots, size = layout(bucket)
        buckets.append(slots)
        sizes.append(size)
        names = list(dict.fromkeys(source[s.name] for s in slots))
        bucket_of.update({n: i for n in names})
        counts.append(len(names))
    return StagePlan(buckets, sizes, bucket_of, counts)


def full_param_specs(module, tp: int, dtype: Optional[torch.dtype] = None) -> list[tuple[str, tuple, torch.dtype]]:
    """``(global name, full shape, dtype)`` of what :func:`~megatron_tppo.weights.gather.iter_full_params`
    yields for this stage, in the same order, without gathering (TP-split dims times ``tp``)."""
    from megatron_tppo.weights.gather import _global_name  # the one place that numbers layers globally

    tied = getattr(module, "share_embeddings_and_output_weights", False)
    out = []
    for name, p in module.named_parameters():
        if name.startswith("output_layer.") and tied:
            continue
        shape = list(p.shape)
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= tp
        out.append((_global_name(module, name), tuple(shape), dtype or p.dtype))
    return out

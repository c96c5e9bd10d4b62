"""Stream policy weights to a rollout engine in size-bounded buckets of HF-named tensors.

Input is an iterator of (megatron name, *full* tensor): the training engine gathers each
parameter's TP shards (and collects it from its pipeline stage) one at a time and yields it, so at
most one bucket of mapped tensors (plus the tensor being gathered) is alive at once; the whole
model is never materialized a second time.

Buckets break only between megatron *modules* (``...linear_qkv`` = its weight and bias): vLLM
reloads a layer when all of its tensors have arrived, so a transport that sends one bucket per
reload call must never split q/k/v, gate/up or a weight from its bias. One module larger than the
bound gets a bucket of its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights.hf_mapping import megatron_to_hf

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class SyncStats:
    """What one weight sync moved and how long it took."""

    bytes: int = 0
    """Bytes of HF tensors handed to the engine."""
    tensors: int = 0
    """Number of HF tensors."""
    buckets: int = 0
    """Number of buckets."""
    seconds: float = 0.0
    """Wall time of the whole sync (gather + map + engine load)."""
    bucket_bytes: list[int] = field(default_factory=list)
    """Size of each bucket in bytes."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def _module_of(megatron_name: str) -> str:
    return megatron_name.rsplit(".", 1)[0]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def hf_buckets(named: Iterable[tuple[str, torch.Tensor]], m: ModelConfig, bucket_bytes: int,
               stats: SyncStats | None = None) -> Iterator[Bucket]:
    """(megatron name, full tensor) stream -> buckets of (HF name, tensor), each <= ``bucket_bytes``.

    A bucket exceeds the bound only when a single module does. ``stats`` (if given) accumulates
    bytes/tensors/buckets as buckets are yielded.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    module: list[tuple[str, torch.Tensor]] = []  # HF tensors of the current megatron module
    module_size, module_name = 0, None

    def flush_bucket():
        nonlocal bucket, size
        out, bucket, size = bucket, [], 0
        if stats is not None:
            stats.buckets += 1
            stats.tensors += len(out)
            stats.bytes += sum(_nbytes(t) for _, t in out)
            stats.bucket_bytes.append(sum(_nbytes(t) for _, t in out))
        return out

    for name, tensor in named:
        if _module_of(name) != module_name and module:
            if bucket and size + module_size > bucket_bytes:
                yield flush_bucket()
            bucket += module
            size += module_size
            module, module_size = [], 0
        module_name = _module_of(name)
        for hf_name, t in megatron_to_hf(name, tensor, m):
            module.append((hf_name, t))
            module_size += _nbytes(t)
    if module:
        if bucket and size + module_size > bucket_bytes:
            yield flush_bucket()
        bucket += module
    if bucket:
        yield flush_bucket()


def sync_weights(engine, named: Iterable[tuple[str, torch.Tensor]], m: ModelConfig, version: int,
                 bucket_bytes: int) -> SyncStats:
    """Stream a full megatron model into a :class:`~megatron_tppo.rollout.RolloutEngine`.

    In-process engines take the buckets as one lazy iterator in a single ``load_weights`` call
    (vLLM reloads layer by layer as they arrive); bucketing bounds what is alive at once and is the
    unit a cross-process transport would send. Returns the bytes moved and the wall time.
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    stream = (pair for bucket in hf_buckets(named, m, bucket_bytes, stats) for pair in bucket)
    engine.load_weights(stream, version=version)
    stats.seconds = time.perf_counter() - t0
    return stats

"""How the engine reduces ``loss_fn`` metrics over micro-batches, data-parallel and pipeline ranks.

The convention is the key's suffix:

- ``*_max``: the largest value (max over micro-batches and DP ranks);
- ``*_min``: the smallest value (min over the same);
- anything else: a sum. Losses and means are reported as this micro-batch's sum divided by the
  global count (see :mod:`megatron_tppo.algorithms.losses`), so their sum is the global value.

Pipeline stages do not reduce: only the last stage computes the loss, and it shares the result.
An extremum over an empty set (no loss tokens) is left to ``loss_fn``: it must report a value that
cannot win, e.g. 0 for a maximum of absolute differences.
"""
from __future__ import annotations

import torch


def reduction(key: str) -> str:
    """"max", "min" or "sum" for a metric named ``key``."""
    if key.endswith("_max"):
        return "max"
    if key.endswith("_min"):
        return "min"
    return "sum"


def pack_metrics(store: list[dict], keys: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce one rank's micro-batch metrics into two float64 vectors in ``keys`` order:
    the sums, and the extrema with minima negated (so one MAX all-reduce finishes both).

    ``store`` may be empty (a rank that computed no loss): the vectors are then the identities
    (0 for sums, -inf for extrema).
    """
    sums = [k for k in keys if reduction(k) == "sum"]
    ext = [k for k in keys if reduction(k) != "sum"]
    vsum = torch.zeros(len(sums), dtype=torch.float64, device=device)
    vext = torch.full((len(ext),), float("-inf"), dtype=torch.float64, device=device)
    sign = torch.tensor([-1.0 if reduction(k) == "min" else 1.0 for k in ext], dtype=torch.float64, device=device)
    for d in store:
        if sums:
            vsum += torch.stack([d[k].to(vsum) for k in sums])
        if ext:
            vext = torch.maximum(vext, sign * torch.stack([d[k].to(vext) for k in ext]))
    return vsum, vext


def unpack_metrics(keys: list[str], vsum: torch.Tensor, vext: torch.Tensor) -> dict[str, float]:
    """Inverse of :func:`pack_metrics` after the all-reduces: ``{key: float}``."""
    sums = iter(vsum.tolist())
    ext = iter(vext.tolist())
    out = {}
    for k in keys:
        kind = reduction(k)
        out[k] = next(sums) if kind == "sum" else (-next(ext) if kind == "min" else next(ext))
    return out

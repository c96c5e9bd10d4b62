"""Device selection: the CPU and GPU paths differ only behind these few functions.

``resolve_device("auto")`` picks cuda when a GPU is visible, else cpu. ``prepare_device(device)``
is called once per training process before megatron-core runs: on cpu it installs the CPU shim
(:mod:`megatron_tppo.platform.cpu`), on cuda it binds the process to its local GPU.
"""
from __future__ import annotations

import os

import torch


def resolve_device(device: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' -> 'cpu' or 'cuda'. Raises when cuda is asked for but absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


def distributed_backend(device: str) -> str:
    """The torch.distributed backend for a resolved device: gloo on cpu, nccl on cuda."""
    return "nccl" if device == "cuda" else "gloo"


def prepare_device(device: str) -> str:
    """Make megatron-core usable on ``device`` (resolved first); returns the resolved device."""
    device = resolve_device(device)
    if device == "cpu":
        from megatron_tppo.platform import cpu

        cpu.install()
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return device

"""Process-group setup for one trained model: torch.distributed plus megatron's parallel_state.

Call :func:`init_parallel` once per process (every rank of the job), before building an engine.
It initializes torch.distributed from the usual env:// variables when needed (gloo on CPU, NCCL
on GPU), prepares the device (the CPU shim on CPU) and creates the TP/PP/DP groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from megatron_tppo.platform import distributed_backend, prepare_device


@dataclass
class ParallelInfo:
    """Sizes and this process's coordinates in the model-parallel grid."""

    device: str
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_parallel(tp: int = 1, pp: int = 1, device: str = "auto", timeout_s: float = 600.0) -> ParallelInfo:
    """Initialize torch.distributed (if not yet) and megatron's parallel_state for TP=tp, PP=pp.

    DP is world_size / (tp * pp). Re-initializes parallel_state when it already exists, so one
    process can host several layouts one after another (tests do).
    """
    device = prepare_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=distributed_backend(device), timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp*pp={tp * pp}")

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=device == "cuda")
    return parallel_info(device)


def parallel_info(device: str) -> ParallelInfo:
    """The current parallel_state coordinates."""
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        device=device,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    """Tear down parallel_state and torch.distributed (end of a process or a test)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

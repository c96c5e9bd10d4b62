"""Start a local Ray cluster, or join the one a launcher started (``ray start`` on a cluster)."""
from __future__ import annotations

import os
from typing import Optional


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> bool:
    """Initialize Ray in this process; returns True when it started a new local cluster.

    ``address`` None (and no RAY_ADDRESS in the environment) starts a local cluster; otherwise it
    joins that cluster ("auto" finds one started on this node). On CPU the actors declare tiny
    CPU fractions, so ``num_cpus`` only bounds Ray's own task scheduling. ``num_gpus`` (local
    cluster only) declares that many GPUs; None lets Ray detect them (logical GPUs on a CPU machine
    make the GPU placement run there).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # workers must see the same package and environment flags as the driver
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("VLLM_", "HF_", "OMP_", "TPPO_", "PYTHONPATH", "CUDA_VISIBLE", "NCCL_", "GLOO_"))}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-request INFO lines drown the step summaries
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return False
    gpus = {} if num_gpus is None else {"num_gpus": num_gpus}
    ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4, num_gpus or 0), include_dashboard=False, **gpus,
             runtime_env={"env_vars": env}, log_to_driver=True)
    return True


def shutdown(started: bool) -> None:
    """Disconnect; stops the cluster only when this process started it."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()

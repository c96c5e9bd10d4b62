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

    Logs: with ``TPPO_LOG_DIR`` set (:func:`megatron_tppo.console.start_run_logs` does it), every
    worker process of this job writes its output to a file there and the console gets only real
    problems (:mod:`megatron_tppo.console`); Ray's INFO lines are not printed.
    """
    import logging

    import ray

    from megatron_tppo.console import LOG_DIR_ENV

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # workers must see the same package and environment flags as the driver
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("VLLM_", "HF_", "OMP_", "TPPO_", "PYTHONPATH", "CUDA_VISIBLE", "NCCL_", "GLOO_"))}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # per-request INFO lines drown the step summaries
    runtime_env: dict = {"env_vars": env}
    if env.get(LOG_DIR_ENV):
        runtime_env["worker_process_setup_hook"] = "megatron_tppo.console.worker_process_setup"
        env.setdefault("VLLM_LOGGING_STREAM", "ext://megatron_tppo.console.vllm_log_stream")
    else:
        env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
        return False
    gpus = {} if num_gpus is None else {"num_gpus": num_gpus}
    ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4, num_gpus or 0), include_dashboard=False, **gpus,
             runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    return True


def describe(started: bool) -> str:
    """One line: which cluster this process is on, its nodes and resources."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    how = "started a local cluster" if started else f"joined {ray.get_runtime_context().gcs_address}"
    return f"{how}: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def shutdown(started: bool) -> None:
    """Disconnect; stops the cluster only when this process started it."""
    import ray

    if started and ray.is_initialized():
        ray.shutdown()

"""The processes the controller places with Ray: trainer ranks and rollout engines.

These classes are plain Python; :mod:`megatron_tppo.controller.groups` wraps them with
``ray.remote`` when it creates actors, so this module imports no Ray itself and the heavy imports
(megatron-core, vLLM) happen inside the actor processes only.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Optional

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _where() -> dict:
    import ray

    return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpu_affinity": sorted(os.sched_getaffinity(0))}  # the cores this process may run on


class TrainerWorker:
    """One rank of a policy or critic trainer (TP x PP x DP ranks form one torch.distributed world)."""

    def __init__(self, rank: int, world_size: int, threads: int = 0):
        self.rank, self.world_size = rank, world_size
        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = None
        self.unscheduled_onloads = 0

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process-group rendezvous (called on rank 0 only)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master: tuple[str, int], model_cfg, layout, optim_cfg, role: str, device: str,
              seed: int, total_steps: int, init_weights: bool = True) -> dict:
        """Join the process group, build megatron parallel state and the engine (``init_weights``
        False: no random initialization, for a caller that loads every weight next)."""
        from megatron_tppo.training import TrainEngine, init_parallel

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
        self.info = init_parallel(layout.tensor_parallel, layout.pipeline_parallel, device)
        self.model_cfg, self.role = model_cfg, role
        self.engine = TrainEngine(model_cfg, layout, optim_cfg, role=role, device=self.info.device, seed=seed,
                                  total_steps=total_steps, init_weights=init_weights)
        return {"rank": self.rank, "tp_rank": self.info.tp_rank, "pp_rank": self.info.pp_rank,
                "dp_rank": self.info.dp_rank, "device": self.info.device}

    def load_hf(self, hf_dir: str) -> int:
        """Initialize from an HF checkpoint (a critic takes the backbone and keeps its fresh head)."""
        from megatron_tppo.weights.hf_io import load_hf_into

        skip = ("output_layer.",) if self.role == "critic" else ()
        n = load_hf_into(self.engine.module, hf_dir, self.model_cfg, skip_prefixes=skip)
        self.engine.weights_changed()  # refresh the optimizer's fp32 main copies (bf16/fp16)
        return n

    def forward(self, batch: dict, with_entropy: bool = False, temperature: float = 1.0) -> Optional[dict]:
        """Per-token outputs for this DP replica's share of the rows (about 1/DP of them, see
        ``data_parallel_rows(equal_rows=True)``): ``{"rows": [b] long, "outputs": {key: [b, T]}}``
        from the replica's first rank (tp=0, pp=0), None from the others. The driver puts the
        parts back in order with ``merge_row_parts``.
        """
        from megatron_tppo.training import data_parallel_rows, row_lengths, select_rows

        rows = data_parallel_rows(row_lengths(batch), self.info.dp, equal_rows=True)[self.info.dp_rank]
        out = {}
        if len(rows):  # a replica without rows has nothing to compute (forwards use no DP collective)
            out = self.engine.forward(select_rows(batch, rows), with_entropy=with_entropy, temperature=temperature)
        lead = self.info.tp_rank == 0 and self.info.pp_rank == 0
        return {"rows": rows, "outputs": {k: v.cpu() for k, v in out.items()}} if lead else None

    def offload(self, params: bool = True, grads: bool | str = True, optimizer: bool = True) -> dict:
        """Free this rank's device memory (see ``TrainEngine.offload``: ``grads="drop"`` frees the
        gradients without a copy, onload zero-fills them); returns what moved."""
        return self.engine.offload(params=params, grads=grads, optimizer=optimizer)

    def onload(self) -> dict:
        """Restore what :meth:`offload` freed: bit-identical, dropped gradients zero-filled."""
        return self.engine.onload()

    def train_step(self, batch: dict, loss_fn, global_num_tokens: float, with_entropy: bool = False,
                   temperature: float = 1.0) -> dict:
        from megatron_tppo.training import split_for_data_parallel

        local = split_for_data_parallel(batch, self.info.dp, self.info.dp_rank)
        return self.engine.train_step(local, loss_fn, global_num_tokens, with_entropy=with_entropy,
                                      temperature=temperature)

    # -- weights straight to the engines (megatron_tppo.controller.weight_sync) -------------------

    def open_weight_transfer(self, path: str, dtype: Optional[str] = None, timeout_s: float = 600.0,
                             has_receiver: bool = False) -> Optional[dict]:
        """Prepare this rank's part in a sync over ``path`` (megatron_tppo.weight_route; every rank
        is called). A rank that sends (broadcast: its stage's TP-rank-0 rank of DP replica 0;
        local: ``has_receiver``, an engine worker sits on its GPU) opens its group's rendezvous and
        returns ``{"rank", "pp_rank", "host", "port", "uuid", "node"}`` (its GPU's UUID, None on CPU;
        its Ray node id); every other rank returns None."""
        import ray

        from megatron_tppo.weights.ipc import this_node
        from megatron_tppo.weights.transfer import LocalSender, StageSender

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype or "", None)
        self.close_weight_transfer()
        e, i = self.engine, self.info
        if path == "local":
            self.sender = LocalSender(e.module, e.tp_group, e.pp_group, i.tp, self.model_cfg, has_receiver=has_receiver,
                                      dtype=dt)
            sends = has_receiver
        else:
            replica0 = i.dp_rank == 0
            sends = replica0 and i.tp_rank == 0
            self.sender = StageSender(e.module, e.tp_group, i.tp, self.model_cfg, is_sender=sends,
                                      takes_part=replica0, dtype=dt)
        if not sends:
            return None
        host, port = self.sender.open(ray.util.get_node_ip_address(), timeout_s=timeout_s)
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) if i.device == "cuda" else None
        return {"rank": self.rank, "pp_rank": i.pp_rank, "host": host, "port": port, "uuid": uuid, "node": this_node()}

    def transfer_site(self) -> dict:
        """Where this rank runs, for the weights' route: rank, device, GPU UUID (None on CPU), node."""
        from megatron_tppo.weights.ipc import this_node

        cuda = self.info.device == "cuda"
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) if cuda else None
        return {"rank": self.rank, "device": self.info.device, "uuid": uuid, "node": this_node()}

    def join_weight_transfer(self, backend: str, world_size: int, timeout_s: float, names: dict) -> None:
        """A sending rank joins its group (blocks until its receivers joined); others return.
        ``names``: receiver rank -> who it is (engine and worker), for stall errors."""
        if self.sender is not None and self.sender.store is not None:
            stage = f"policy rank {self.rank}, pipeline stage {self.info.pp_rank}"
            self.sender.join(backend, world_size, timeout_s, names, stage)

    def send_weights(self, bucket_bytes: int) -> dict:
        """One sync: this rank's part (gather, relay, send; see megatron_tppo.weights.transfer)."""
        return {**self.sender.send(bucket_bytes), "rank": self.rank, "pp_rank": self.info.pp_rank,
                "tp_rank": self.info.tp_rank}

    def close_weight_transfer(self) -> None:
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.close()
        self.sender = None

    def memory(self, reset: bool = False) -> dict:
        """This process's resident set: current and peak bytes (peak since the last ``reset=True``)."""
        from megatron_tppo.weights.memprobe import reset_peak_rss, rss_bytes

        cur, peak = rss_bytes()
        if reset:
            reset_peak_rss()
        return {"rss_bytes": cur, "rss_peak_bytes": peak}

    def _on_device(self, fn, *args):
        """Run ``fn`` with everything on the device, then offload again what was off before
        (a checkpoint written between steps finds a colocated trainer offloaded)."""
        was, dropped = set(self.engine.offloaded), set(self.engine.dropped)
        if was:
            self.unscheduled_onloads += 1  # the memory schedule should have brought it back
            self.engine.onload()
        try:
            return fn(*args)
        finally:
            if was:  # dropped gradients are zero now: dropping them again loses nothing
                grads = "drop" if "grads" in dropped else "grads" in was
                self.engine.offload(params="params" in was, grads=grads, optimizer="optimizer" in was)

    def memory_state(self) -> dict:
        """What this rank holds off the device (for the memory trace): kinds offloaded (copied to
        host), kinds dropped, and how many saves or loads had to onload it outside the schedule."""
        return {"offloaded": sorted(self.engine.offloaded), "dropped": sorted(self.engine.dropped),
                "unscheduled_onloads": self.unscheduled_onloads}

    def save(self, path: str, with_optimizer: bool = True) -> None:
        self._on_device(self.engine.save, path, with_optimizer)

    def load(self, path: str, with_optimizer: bool = True) -> None:
        self._on_device(self.engine.load, path, with_optimizer)

    def ping(self) -> dict:
        """Where this actor runs (pid and node address), for the run's actors.json."""
        return _where()


def _gpu_total_bytes(visible_devices: str) -> float:
    """Total memory of the first of ``visible_devices``, read through NVML (no CUDA context in
    this actor; NVML numbers GPUs physically, as CUDA_VISIBLE_DEVICES does); torch as a fallback."""
    first = visible_devices.split(",")[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(first))
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        return float(torch.cuda.mem_get_info(0)[1])


class RolloutWorker:
    """One generation engine (vLLM), behind the narrow :class:`RolloutEngine` interface."""

    def __init__(self, backend: str, model_path: str, rollout_cfg, model_cfg, threads: int = 0,
                 visible_devices: Optional[str] = None, weights: str = "checkpoint", utilization=None):
        if visible_devices is not None:
            # Ray gave this actor a share of its first GPU; the engine's TP workers (vLLM's own
            # processes, spawned below) must see all of the engine's GPUs (megatron_tppo.planning.layout)
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
        if threads > 0:
            torch.set_num_threads(threads)
        from megatron_tppo.rollout import engine_class

        self.weights = weights  # what the engine started from (megatron_tppo.rollout.base.StartWeights)
        if utilization is not None and visible_devices is not None:
            # the engine's budget from the memory schedule, for this GPU's memory (before vLLM starts)
            import dataclasses

            total = _gpu_total_bytes(visible_devices)
            rollout_cfg = dataclasses.replace(rollout_cfg, gpu_memory_utilization=utilization(total))
        self.engine = engine_class(backend).from_config(model_path, rollout_cfg, model_cfg, weights=weights)

    def generate(self, prompts, max_tokens, sampling, n: int = 1):
        return self.engine.generate(prompts, max_tokens, sampling, n)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.engine, method)(*args, **kwargs)

    def memory(self, reset: bool = False) -> dict:
        """Resident set (current, peak since the last ``reset=True``) of this actor and, for an
        engine with worker processes, of each worker (``"workers"``)."""
        from megatron_tppo.weights.memprobe import reset_peak_rss, rss_bytes

        workers = self.engine.worker_memory(reset) if getattr(self.engine, "remote_workers", False) else []
        cur, peak = rss_bytes()
        if reset:
            reset_peak_rss()
        return {"rss_bytes": cur, "rss_peak_bytes": peak, "workers": workers}

    def ping(self) -> dict:
        """Where this actor runs (pid and node address) and what its engine started from
        (``weights``), for the run's actors.json."""
        return {**_where(), "weights": self.weights}

"""The machines a plan is made for: one GPU's and one host's numbers, every one a named input.

Each figure is an assumption or a vendor number (the docstring says which); ``plan`` takes the
most consequential ones as flags and every one is a field a caller may replace. :class:`Links`
holds what a weight sync crosses (``plan`` makes a flag of each of its fields).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GiB = 2 ** 30

MARKETED_GPU_GIB = {80.0: 79.6, 94.0: 93.1, 141.0: 140.4}
"""Marketed GPU sizes (GB) and what the driver reports (GiB): H100 SXM 80 GB = 81559 MiB,
H100 NVL 94 GB = 95830 MiB, H200 141 GB = 143771 MiB. ``--gpu-mem-gb`` takes either."""


def gpu_memory_gib(gb: float) -> float:
    """The memory a driver reports for a GPU sold as ``gb`` GB (other values are taken as GiB)."""
    return MARKETED_GPU_GIB.get(float(gb), float(gb))


@dataclass(frozen=True)
class GPU:
    """One accelerator (defaults: H100 SXM 80 GB)."""

    memory_gib: float = 79.6
    """Total memory as the driver reports it (81559 MiB on an H100 SXM 80 GB)."""
    cuda_context_gib: float = 0.75
    """Per process on the GPU: the CUDA context, cuBLAS/cuDNN workspaces and loaded kernels
    (assumption; PyTorch with lazy module loading reports 0.5-0.6 GiB on H100)."""
    nccl_gib: float = 1.0
    """Per process with NCCL communicators (a trainer rank's TP, PP, DP and embedding groups;
    an engine worker's TP group): their channel buffers (assumption; NCCL_BUFFSIZE 4 MiB per
    channel and peer)."""
    fragmentation: float = 0.05
    """Share of a trainer's allocated bytes lost to the caching allocator's fragmentation."""
    engine_asleep_gib: float = 1.0
    """What a vLLM worker keeps on the GPU while asleep besides its context: the CUDA-graph pool
    and allocations outside the sleep allocator's pool (assumption)."""
    headroom_gib: float = 3.0
    """Kept free in every phase, for transients no term counts (assumption)."""
    peak_tflops_bf16: float = 989.0
    """Dense BF16 tensor-core peak."""
    peak_tflops_fp8: float = 1979.0
    """Dense FP8 tensor-core peak."""
    hbm_tb_s: float = 3.35
    """HBM bandwidth."""
    train_mfu: float = 0.40
    """Assumed model-FLOPs utilization of training (forward + backward)."""
    decode_bw_efficiency: float = 0.70
    """Fraction of HBM bandwidth a decode iteration achieves."""
    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB


@dataclass(frozen=True)
class Host:
    """One node's host side (defaults: a DGX H100-class node)."""

    memory_gib: float = 2048.0
    """Host memory per node (DGX H100: 2 TiB)."""
    object_store_gib: float | None = None
    """Ray's object store per node; None: Ray's default, 30% of host memory capped at 200 GB."""
    trainer_process_gib: float = 6.0
    """Resident memory of one trainer process besides its offload buffer (torch, CUDA and NCCL
    libraries, megatron, Python heap): assumption."""
    engine_process_gib: float = 8.0
    """Resident memory of one vLLM worker process and its share of the engine core (assumption)."""
    ray_node_gib: float = 4.0
    """Raylet, GCS (head), dashboard and log monitor per node (assumption)."""
    fs_read_gb_s: float = 5.0
    """Checkpoint/model read bandwidth per node from the shared filesystem (assumption)."""
    fs_write_gb_s: float = 3.0
    """Checkpoint write bandwidth per node (assumption)."""
    pcie_gb_s: float = 20.0
    """Host <-> GPU copy bandwidth per GPU, pinned (PCIe Gen5 x16 achieves about 50; shared)."""

    @property
    def object_store_bytes(self) -> float:
        if self.object_store_gib is not None:
            return self.object_store_gib * GiB
        return min(0.3 * self.memory_gib * GiB, 200e9)


@dataclass(frozen=True)
class Links:
    """The links a weight sync crosses, per GPU (defaults: HGX/DGX H100 nodes, NDR InfiniBand).

    Every default is an assumption with its source; ``plan`` takes each as a flag
    (``--nvlink-gb-s`` ...): put measured numbers there. :func:`megatron_tppo.planning.time_model.sync_estimate`
    prices each term of a sync with them."""

    nvlink_gb_s: float = 350.0
    """NCCL bus bandwidth of an all-gather (and of a broadcast) inside one node over NVLink and
    NVSwitch, GB/s (assumption: nccl-tests on 8x H100 SXM report about 450-480 GB/s busbw for
    all-reduce, which NVLink SHARP helps, against NVLink 4's 450 GB/s per direction; all-gather is
    taken lower)."""
    hbm_copy_gb_s: float = 1300.0
    """Device-to-device copy inside one GPU, GB/s of bytes copied (assumption: a copy reads and
    writes every byte, so about 40% of HBM3's 3.35 TB/s on an H100 SXM; CUDA's bandwidthTest counts
    both directions and reports twice this)."""
    ib_gb_s: float = 40.0
    """InfiniBand per GPU, GB/s, where a group crosses nodes (assumption: one 400 Gb/s NDR port per
    GPU, 50 GB/s line rate, NCCL reaching about 80% of it)."""
    ipc_bucket_ms: float = 2.0
    """Fixed cost of one bucket handed to an engine worker as a CUDA IPC handle, ms: the handle's
    export and open and the control message that carries it (assumption: a local RPC round trip
    and a handle open are each of the order of a millisecond)."""
    gloo_gb_s: float = 2.0
    """One TCP hop of gloo between host buffers, GB/s (assumption: one TCP stream over the nodes'
    front-end network or IPoIB; this development machine's loopback measured 0.36 GB/s for the
    direct gloo path). gloo's broadcast is a binomial tree, not pipelined: a bucket crosses
    ceil(log2(receivers + 1)) such hops one after another."""
    nccl_broadcast_gb_s: Optional[float] = None
    """An NCCL broadcast from a stage's sender to the engine workers (pipelined along a ring: its
    slowest link), GB/s; None: ``ib_gb_s`` when the group spans nodes, else ``nvlink_gb_s``."""
    sync_gb_s: Optional[float] = None
    """A measured end-to-end sync rate (bf16 bytes of the policy per second), GB/s; when set it
    replaces the model (benchmarks/weight_sync.py measures one)."""

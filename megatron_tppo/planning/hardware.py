"""The machines a plan is made for: one GPU's and one host's numbers, every one a named input.

Each figure is an assumption or a vendor number (the docstring says which); ``plan`` takes the
most consequential ones as flags and every one is a field a caller may replace.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    sync_nccl_gb_s: float = 25.0
    """Weight sync over NCCL or CUDA IPC (GB/s of bf16 weights into every engine): an assumption
    between the field's anchors for ~30B models (NeMo-RL 0.74-1.0 s, about 65 GB/s; verl about
    4.4 s, about 14 GB/s)."""
    sync_gloo_gb_s: float = 2.0
    """Weight sync over gloo, host-staged: a TCP broadcast from each stage's sender."""

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

"""What one component holds in one state: a trainer rank on its GPU (by state and work) and in
host memory (its offload buffer), an engine worker on its GPU; bytes, item by item.

Pure counting for :mod:`.schedule`, which places these holdings in its phases; the parameter
and activation counts come from :mod:`.memory`, the CUDA/NCCL reserves from :mod:`.hardware`.
"""
from __future__ import annotations

from typing import Optional

from megatron_tppo.planning.hardware import GPU, GiB
from megatron_tppo.planning.memory import (activation_bytes_per_token_layer, embedding_params, layer_params,
                                           model_params, weight_bytes_per_param)


def rank_params(m, lay, stage: int, value_head: bool) -> float:
    """Parameters one trainer rank of pipeline stage ``stage`` holds (its 1/TP of the stage's layers,
    the embedding on the first stage, the final norm and the output layer or value head on the last)."""
    t, p = lay.tensor_parallel, lay.pipeline_parallel
    n = (m.num_layers // p) * layer_params(m) / t
    if stage == 0:
        n += embedding_params(m) / t
    if stage == p - 1:
        n += m.hidden_size + (m.hidden_size if value_head else (0 if m.tie_word_embeddings else embedding_params(m) / t))
    return n


def trainer_items(cfg, role: str, rank: int, state: str, work: Optional[str], gpu: GPU) -> list[tuple[str, float]]:
    """What trainer rank ``rank`` of ``role`` holds on its GPU in ``state`` doing ``work``."""
    m = cfg.model
    lay = getattr(cfg.parallel, role)
    if state == "absent":
        return []
    value_head = role == "critic"
    stage = rank // (lay.tensor_parallel * lay.data_parallel)
    n = rank_params(m, lay, stage, value_head)
    wb = weight_bytes_per_param(m)
    weights, grads = n * wb, n * 4.0
    optimizer = n * (8 + (4 if wb != 4 else 0)) / lay.data_parallel
    items = [("context", gpu.cuda_context_gib * GiB), ("nccl", gpu.nccl_gib * GiB)]
    if state == "resident":
        items += [("weights", weights), ("grads", grads), ("optimizer", optimizer)]
    elif state == "params":
        items += [("weights", weights)]
    if m.fp8:  # TE's FP8 weight workspaces (the copy and its transpose) live on the module: no offload moves them
        items.append(("fp8 weight cache", n * 2.0))
    tok, h = lay.micro_batch_tokens, m.hidden_size
    per_layer = activation_bytes_per_token_layer(m, lay.tensor_parallel) * tok
    last = stage == lay.pipeline_parallel - 1
    if work == "train":
        in_flight = lay.pipeline_parallel - stage  # 1F1B: micro-batches in flight on this stage
        layers = m.num_layers // lay.pipeline_parallel
        kept = 2.0 * h * tok if lay.recompute == "full" else per_layer
        items.append(("activations", in_flight * layers * kept + (per_layer if lay.recompute == "full" else 0)))
        if last and not value_head:
            items.append(("logits", 2 * 4.0 * tok * m.padded_vocab_size / lay.tensor_parallel))
    elif work == "forward":
        items.append(("activations", per_layer + 2.0 * h * tok))
    elif work in ("load", "resume", "save"):
        # torch_dist builds the optimizer's sharded state as new tensors: a second copy while
        # it is read or written; a starting-weights load reads into the model's own tensors
        staging = optimizer if work != "load" else 0.0
        items.append(("checkpoint staging", staging + embedding_params(m) / lay.tensor_parallel * wb))
    elif work == "gather":
        # the bucket being handed over, plus one TP-gathered tensor (at most the embedding)
        items.append(("sync buffers", cfg.rollout.weight_sync_bucket_mb * 2 ** 20 + embedding_params(m) * wb))
    alloc = sum(b for k, b in items if k not in ("context", "nccl"))
    items.append(("fragmentation", gpu.fragmentation * alloc))
    return items


def engine_items(cfg, state: str, gpu: GPU, utilization: float) -> list[tuple[str, float]]:
    """What one engine worker holds on its GPU in ``state``."""
    r, m = cfg.rollout, cfg.model
    if state == "absent":
        return []
    items = [("context", gpu.cuda_context_gib * GiB)]
    if r.tensor_parallel > 1:
        items.append(("nccl", gpu.nccl_gib * GiB))
    if state == "awake":
        items.append(("budget: weights, activations, KV cache", utilization * gpu.memory_bytes))
    else:
        items.append(("engine asleep", gpu.engine_asleep_gib * GiB))
        if state == "weights":
            items.append(("engine weights", model_params(m) * 2.0 / r.tensor_parallel))
    return items


def offload_buffer_bytes(cfg, role: str, rank: int) -> float:
    """The host buffer of one trainer rank's offload: its weights and optimizer state, exactly
    (one buffer per rank, :mod:`megatron_tppo.training.offload`); gradients are dropped, not kept."""
    m = cfg.model
    lay = getattr(cfg.parallel, role)
    stage = rank // (lay.tensor_parallel * lay.data_parallel)
    n = rank_params(m, lay, stage, role == "critic")
    wb = weight_bytes_per_param(m)
    return n * wb + n * (8 + (4 if wb != 4 else 0)) / lay.data_parallel

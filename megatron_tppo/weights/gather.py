"""Full tensors from a TP/PP-sharded megatron-core GPT model, one parameter at a time.

:func:`iter_full_params` runs on every rank of one model replica (a collective over the TP
group) and yields, on each rank, ``(global megatron name, full tensor)`` for the parameters of
that rank's pipeline stage. Layer names carry the *global* layer number, so the streams of all
pipeline stages concatenated form the whole model, in the names
:mod:`megatron_tppo.weights.hf_mapping` understands. Only one parameter is gathered at a time, so
no second full copy of the model is ever held.

TP layouts undone here (megatron-core marks split parameters with ``tensor_model_parallel`` and
``partition_dim``):
  * column-parallel weights/biases (QKV, fc1, vocab-parallel embedding and output layer) are split
    along dim 0, row-parallel weights (attention proj, fc2) along dim 1: concatenate the shards;
  * the fused QKV shard of rank r holds whole query groups r*G/tp .. so plain concatenation gives
    the per-group interleaved full layout;
  * fc1 with SwiGLU is built with ``partition_stride=2`` and holds ``[gate_r; up_r]`` on each
    rank: every shard is cut into ``stride`` parts and the parts regrouped into ``[gate; up]``.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _global_name(module, name: str) -> str:
    """Local pipeline-stage name -> global name (decoder.layers.<local> -> global layer number)."""
    m = _LAYER.match(name)
    if m is None:
        return name
    local, rest = int(m.group(1)), m.group(2)
    layer = module.decoder.layers[local]
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _gather_tp(t: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    shards = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(shards, t.contiguous(), group=group)
    # a strided shard is [part_0 of rank r; part_1 of rank r; ...]: regroup part by part
    parts = [s.chunk(stride, dim) for s in shards]
    return torch.cat([parts[r][j] for j in range(stride) for r in range(world)], dim)


def iter_full_params(module, tp_group=None, include_output_layer: bool = True,
                     dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (global name, full tensor) for this pipeline stage's parameters (TP collective).

    Args:
        module: the unwrapped megatron-core GPTModel of this rank's stage (not the DDP wrapper).
        tp_group: the tensor-parallel group (default: megatron's parallel_state group).
        include_output_layer: False skips ``output_layer.*`` (e.g. a tied policy's duplicate).
        dtype: cast gathered tensors (e.g. to the rollout engine's dtype); None keeps theirs.
    Every TP rank must call this with the same arguments (the gathers are collective); every TP
    rank receives the full tensors. Tensors are detached copies, safe to send elsewhere.
    """
    if tp_group is None:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    tied = getattr(module, "share_embeddings_and_output_weights", False)
    for name, param in module.named_parameters():
        if name.startswith("output_layer.") and (tied or not include_output_layer):
            continue  # a tied model's last stage holds a copy of the embedding
        t = param.detach()
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            t = _gather_tp(t, param.partition_dim, getattr(param, "partition_stride", 1), tp_group)
        else:
            t = t.clone()
        yield _global_name(module, name), (t if dtype is None else t.to(dtype))


def full_state_dict(module, tp_group=None) -> dict[str, torch.Tensor]:
    """All of this stage's parameters as full tensors (small models and tests)."""
    return dict(iter_full_params(module, tp_group))


def shard_for_rank(full: torch.Tensor, param, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of a full tensor for ``param`` (inverse of the gather above)."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(stride * tp, dim)
    return torch.cat([pieces[j * tp + tp_rank] for j in range(stride)], dim)


@torch.no_grad()
def load_full_params(module, get_full, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Copy full tensors into this rank's (TP-sharded, pipeline-stage) parameters.

    Args:
        module: the unwrapped GPTModel of this stage.
        get_full: ``global megatron name -> full tensor`` (e.g. built from an HF checkpoint with
            :func:`megatron_tppo.weights.hf_mapping.hf_to_megatron`).
        skip_prefixes: local names to leave alone (e.g. ``("output_layer.",)`` for a critic's head).
    Returns the number of tensors copied. Shape mismatches raise ValueError naming the tensor.
    """
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    n = 0
    for name, param in module.named_parameters():
        if name.startswith(skip_prefixes):
            continue
        gname = _global_name(module, name)
        shard = shard_for_rank(get_full(gname), param, tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(f"{gname}: source shard {tuple(shard.shape)} does not fit parameter {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))
        n += 1
    return n

"""Streaming safetensors output: plan a stage's HF tensors, write shards tensor by tensor.

Used by megatron -> HF conversion (:mod:`megatron_tppo.weights.convert`): the header of each shard
is planned in advance from the parameter shapes (meta tensors through the one name map), then the
gathered tensors' bytes are appended as they arrive, so no shard is ever held in memory. Each
pipeline stage writes ``part-<stage>-*.safetensors``; :func:`finish_hf_dir` renames them into the
standard ``model-0000i-of-0000N.safetensors`` set and writes the index.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights.hf_mapping import megatron_to_hf

_ST_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_stage(module, m: ModelConfig, tp: int, dtype: torch.dtype, skip_output: bool) -> list[tuple[str, tuple]]:
    """(HF name, shape) of every tensor this pipeline stage yields, in iter_full_params' order.

    Full shapes come from the local shards and their TP split; the HF names from the one map
    applied to meta tensors (no data touched).
    """
    from megatron_tppo.weights.gather import _global_name

    tied = getattr(module, "share_embeddings_and_output_weights", False)
    out = []
    for name, p in module.named_parameters():
        if name.startswith("output_layer.") and (tied or skip_output):
            continue
        shape = list(p.shape)
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            shape[p.partition_dim] *= tp
        meta = torch.empty(shape, dtype=dtype, device="meta")
        out += [(n, tuple(t.shape)) for n, t in megatron_to_hf(_global_name(module, name), meta, m)]
    return out


class ShardStreamWriter:
    """Writes planned safetensors shards tensor by tensor: header first, then each tensor's bytes."""

    def __init__(self, directory: Path, prefix: str, plan: list[tuple[str, tuple]], dtype: torch.dtype,
                 max_shard_size: int):
        self.directory, self.dtype, self.item = Path(directory), dtype, torch.empty((), dtype=dtype).element_size()
        self.shards: list[list[tuple[str, tuple]]] = [[]]
        size = 0
        for name, shape in plan:
            n = math.prod(shape) * self.item
            if self.shards[-1] and size + n > max_shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape))
            size += n
        self.files = [f"{prefix}-{i:05d}.safetensors" for i in range(len(self.shards))]
        self.total_bytes = sum(math.prod(s) for _, s in plan) * self.item
        self._queue = [(i, name, shape) for i, shard in enumerate(self.shards) for name, shape in shard]
        self.written, self._file, self._fh = 0, -1, None

    def _header(self, shard) -> bytes:
        head, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = math.prod(shape) * self.item
            head[name] = {"dtype": _ST_CODE[self.dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> int:
        if self.written >= len(self._queue):
            raise RuntimeError(f"unplanned tensor {name!r}")
        i, want, shape = self._queue[self.written]
        if (name, tuple(tensor.shape)) != (want, shape) or tensor.dtype != self.dtype:
            raise RuntimeError(f"expected {want} {shape} {self.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if i != self._file:
            self.close()
            self._fh, self._file = open(self.directory / self.files[i], "wb"), i
            self._fh.write(self._header(self.shards[i]))
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self.written += 1
        return data.numel()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> list[dict]:
        self.close()
        if self.written != len(self._queue):
            raise RuntimeError(f"only {self.written} of {len(self._queue)} planned tensors were written")
        return [{"file": f, "names": [n for n, _ in s], "bytes": sum(math.prod(sh) for _, sh in s) * self.item}
                for f, s in zip(self.files, self.shards)]


def finish_hf_dir(out: Path, pp: int) -> int:
    """Rename the stages' part files to model-0000i-of-0000N and write the index; returns bytes."""
    parts = []
    for stage in range(pp):
        meta = out / f"part-{stage:03d}.json"
        parts += json.loads(meta.read_text())
        meta.unlink()
    weight_map, total, n = {}, 0, len(parts)
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / part["file"]).rename(out / name)
        weight_map.update({t: name for t in part["names"]})
        total += part["bytes"]
    # Always an index, even for one shard: it also keeps vLLM from loading value_head.safetensors.
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total

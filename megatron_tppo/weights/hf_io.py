"""Read Hugging Face safetensors checkpoints one tensor at a time.

:class:`HFCheckpoint` opens a model directory (single ``model.safetensors`` or a sharded set with
``model.safetensors.index.json``) and reads single tensors lazily with ``safe_open``, so memory
stays bounded by one tensor, never the whole model. :func:`load_hf_into` fills a (TP-sharded,
pipeline-stage) megatron-core GPTModel from such a directory through the pure name maps of
:mod:`megatron_tppo.weights.hf_mapping`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from megatron_tppo.config import ModelConfig


class HFCheckpointError(ValueError):
    """A model directory that cannot be read as an HF safetensors checkpoint (names the file)."""


class HFCheckpoint:
    """Lazy, per-tensor access to an HF safetensors checkpoint directory."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HFCheckpointError(f"HF model directory {str(self.path)!r} does not exist")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise HFCheckpointError(f"{cfg} is missing")
        self.config = json.loads(cfg.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self.files = {name: self.path / f for name, f in weight_map.items()}
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise HFCheckpointError(f"{self.path} has neither model.safetensors nor model.safetensors.index.json")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise HFCheckpointError(f"checkpoint shard(s) missing: {', '.join(missing)}")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            file = self.files[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}") from None
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()


class _LazyHF(dict):
    """Mapping view for hf_to_megatron: reads a tensor from disk only when asked."""

    def __init__(self, ckpt: HFCheckpoint):
        super().__init__()
        self.ckpt = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt[name]


def load_hf_into(module, hf_dir: Union[str, Path], m: ModelConfig, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Copy an HF checkpoint into this rank's stage of a megatron GPTModel; returns tensors copied."""
    from megatron_tppo.weights.gather import load_full_params
    from megatron_tppo.weights.hf_mapping import hf_to_megatron

    ckpt = HFCheckpoint(hf_dir)
    hf_vocab = ckpt.config.get("vocab_size")
    if hf_vocab is not None and hf_vocab != m.vocab_size:
        raise HFCheckpointError(f"{ckpt.path}/config.json has vocab_size={hf_vocab} but model.vocab_size={m.vocab_size}")
    lazy = _LazyHF(ckpt)
    try:
        return load_full_params(module, lambda name: hf_to_megatron(name, lazy, m), skip_prefixes)
    finally:
        ckpt.close()

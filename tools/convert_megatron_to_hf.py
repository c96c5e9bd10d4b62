"""Convert a megatron-core torch_dist checkpoint (policy or critic) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --checkpoint CKPT --output HF [--dtype bf16] [--tp 1 --pp 1]
        [--max-shard-size 2GB] [--hf-config DIR] [--force]

Loads the checkpoint at --tp/--pp (any layout: torch_dist reshards on load; default one process),
gathers one tensor at a time, maps it to its HF names and appends it to a pre-planned safetensors
shard, so neither the model nor a shard is buffered twice. Writes model-0000i-of-0000N.safetensors
+ model.safetensors.index.json, config.json, generation_config.json and tokenizer files when known;
transformers and vLLM load the directory as is.

The model is described by the checkpoint's tppo_convert.json (written by convert_hf_to_megatron);
a checkpoint without it (e.g. a training checkpoint) needs --hf-config, a directory whose
config.json describes the model. A critic becomes a CausalLM whose lm_head is tied to the embedding
(a critic has no LM head) plus value_head.safetensors (outside the index; loaders ignore it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tppo.weights.convert import (  # noqa: E402
    ConvertError, MegatronToHFJob, convert_megatron_to_hf, parse_size, summarize)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="torch_dist checkpoint directory")
    ap.add_argument("--output", required=True, help="HF directory to write")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at (more processes)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at (more processes)")
    ap.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    ap.add_argument("--hf-config", default=None, help="HF dir/config.json describing the model (if no sidecar)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    job = MegatronToHFJob(a.checkpoint, a.output, a.tp, a.pp, a.dtype, a.hf_config, parse_size(a.max_shard_size))
    try:
        stats = convert_megatron_to_hf([job], force=a.force, device=a.device, progress=not a.no_progress)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(stats))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

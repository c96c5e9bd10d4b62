"""Convert a Hugging Face Qwen2/Llama checkpoint to a megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF --output CKPT --tp 2 --pp 1 [--dtype bf16] [--critic] [--force]

Starts its own tp*pp processes (gloo on CPU, NCCL with --device cuda); each rank builds its stage
of the model from config.json, loads the HF tensors it owns (one at a time) and saves torch_dist
(model only). The checkpoint loads at any TP/PP layout. CKPT also gets ``tppo_convert.json``
(ModelConfig, source, layout, dtype, role) and ``hf_files/`` (tokenizer, generation config), so
tools/convert_megatron_to_hf.py needs nothing else. ``--critic`` writes a critic: same backbone,
value head from the directory's value_head.safetensors when present (a converted critic), else fresh.
Errors (unsupported architecture, config/shape mismatch, missing shard, existing output) are
reported before any process starts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tppo.weights.convert import ConvertError, HFToMegatronJob, convert_hf_to_megatron, summarize  # noqa: E402
from megatron_tppo.weights.hf_io import HFCheckpointError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--output", required=True, help="torch_dist checkpoint directory to write")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saving layout")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saving layout")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="parameter dtype (auto: the HF config's)")
    ap.add_argument("--critic", action="store_true", help="write a critic (value head instead of the LM head)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    job = HFToMegatronJob(a.hf_dir, a.output, a.tp, a.pp, a.dtype, a.critic)
    try:
        stats = convert_hf_to_megatron([job], force=a.force, device=a.device, progress=not a.no_progress)
    except (ConvertError, HFCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(stats))
    print(f"wrote {a.output} (tp={a.tp}, pp={a.pp}, {'critic' if a.critic else 'policy'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

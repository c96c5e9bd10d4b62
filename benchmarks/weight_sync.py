"""Weight sync into a live vLLM engine: seconds and bytes/s against model size.

For each size: a random Qwen2 (made offline with transformers) starts a vLLM engine; its weights in
megatron's full-tensor layout (what :func:`megatron_tppo.weights.gather.iter_full_params` yields
after the TP gather) are then streamed into the live engine with
:func:`megatron_tppo.weights.buckets.sync_weights`: the name/layout map, size-bounded buckets,
vLLM's in-place reload and the prefix-cache reset. The TP gather itself is measured in training
runs (``perf/weight_gather_s``). Prints a table and writes benchmarks/results/weight_sync.json.

    .venv/bin/python benchmarks/weight_sync.py [--sizes tiny small medium large] [--bucket-mb 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from megatron_tppo.config import ModelConfig

SIZES = {  # name -> (layers, hidden, ffn, heads, kv groups, vocab)
    "tiny": (4, 256, 704, 4, 2, 512),
    "small": (8, 512, 1408, 8, 2, 8192),
    "medium": (12, 768, 2048, 12, 4, 32000),
    "large": (16, 1024, 2816, 16, 4, 32000),
}


def model_config(name: str) -> ModelConfig:
    layers, hidden, ffn, heads, groups, vocab = SIZES[name]
    return ModelConfig(arch="qwen2", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab,
                       max_position_embeddings=256, tie_word_embeddings=False)


def run_size(name: str, bucket_mb: int, repeats: int) -> dict:
    from megatron_tppo.rollout.vllm_backend import VLLMEngine
    from megatron_tppo.weights.buckets import sync_weights
    from megatron_tppo.weights.hf_config import random_hf_model
    from megatron_tppo.weights.hf_mapping import hf_state_dict_to_megatron

    m = model_config(name)
    model = random_hf_model(m, seed=0)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        full = hf_state_dict_to_megatron(model.state_dict(), m)
        del model
        t0 = time.perf_counter()
        engine = VLLMEngine(d, max_model_len=256, cpu_kv_cache_gb=0.5)
        start_s = time.perf_counter() - t0
        best = None
        for version in range(1, repeats + 1):
            st = sync_weights(engine, iter(full.items()), m, version, bucket_mb << 20)
            if best is None or st.seconds < best.seconds:
                best = st
        engine.shutdown()
    return {"size": name, "params_m": params / 1e6, "bytes": best.bytes, "buckets": best.buckets,
            "sync_s": best.seconds, "gb_per_s": best.bytes / best.seconds / 1e9, "engine_start_s": start_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "weight_sync.json"))
    a = p.parse_args()
    rows = [run_size(s, a.bucket_mb, a.repeats) for s in a.sizes]
    head = f"{'size':<8}{'params (M)':>11}{'MB':>9}{'buckets':>8}{'sync s':>8}{'GB/s':>7}{'vLLM start s':>13}"
    print(f"\n{head}\n{'-' * len(head)}")
    for r in rows:
        print(f"{r['size']:<8}{r['params_m']:>11.1f}{r['bytes'] / 2**20:>9.1f}{r['buckets']:>8}{r['sync_s']:>8.2f}"
              f"{r['gb_per_s']:>7.2f}{r['engine_start_s']:>13.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"bucket_mb": a.bucket_mb, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

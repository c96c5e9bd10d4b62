"""Checkpoint conversion throughput and peak memory on a ~1 GB model (random Qwen2, ~260M fp32 params).

    python benchmarks/convert.py [--layers 20] [--work /dev/shm/tppo_convert_bench] [--keep]

Builds the HF model once with transformers (not timed), then times, each as its own launch:
HF -> megatron at TP1 and TP2, megatron (TP2 checkpoint) -> HF loaded at TP1 with 2 GB shards,
and checks the round trip is bit-exact. GB/s counts the HF safetensors bytes over the whole call,
process start and the megatron import included (~10 s on 2 CPU cores); "work" is the slowest
rank's load + save/stream time alone (model construction excluded). Peak RSS is the largest ru_maxrss of any rank (and of this launcher). Writes
benchmarks/results/convert.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_tppo.config import ModelConfig  # noqa: E402
from megatron_tppo.weights.convert import (  # noqa: E402
    HFToMegatronJob, MegatronToHFJob, convert_hf_to_megatron, convert_megatron_to_hf)
from megatron_tppo.weights.hf_config import save_random_hf_model  # noqa: E402
from megatron_tppo.weights.hf_io import HFCheckpoint  # noqa: E402


def model(layers: int) -> ModelConfig:
    return ModelConfig(arch="qwen2", num_layers=layers, hidden_size=1024, ffn_hidden_size=2816,
                       num_attention_heads=16, num_query_groups=4, vocab_size=32000, max_position_embeddings=2048,
                       qkv_bias=True, tie_word_embeddings=True)


def bit_exact(a: Path, b: Path) -> bool:
    x, y = HFCheckpoint(a), HFCheckpoint(b)
    names = set(x.names()) - {"lm_head.weight"}
    return names == set(y.names()) and all(torch.equal(x[n], y[n]) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--work", default="/dev/shm/tppo_convert_bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    m = model(a.layers)
    t0 = time.perf_counter()
    save_random_hf_model(m, work / "hf", seed=0)
    build_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    rows = []
    try:
        for name, fn, job in (
            ("hf->megatron tp1", convert_hf_to_megatron, HFToMegatronJob(str(work / "hf"), str(work / "ck1"), 1, 1, "fp32")),
            ("hf->megatron tp2", convert_hf_to_megatron, HFToMegatronJob(str(work / "hf"), str(work / "ck2"), 2, 1, "fp32")),
            ("megatron(tp2)->hf tp1", convert_megatron_to_hf, MegatronToHFJob(str(work / "ck2"), str(work / "hf2"))),
        ):
            s = fn([job], progress=False)
            rows.append({"step": name, "ranks": s["world"], "gb": s["bytes"] / 1e9, "seconds": s["seconds"],
                         "gb_per_s": s["bytes"] / 1e9 / s["seconds"],
                         "work_seconds": max(r["work_seconds"] for r in s["ranks"]),
                         "work_gb_per_s": s["bytes"] / 1e9 / max(r["work_seconds"] for r in s["ranks"]),
                         "peak_rss_gib": max(r["peak_rss_bytes"] for r in s["ranks"]) / 2**30})
        exact = bit_exact(work / "hf", work / "hf2")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"model": {"arch": m.arch, "layers": m.num_layers, "hidden": m.hidden_size, "vocab": m.vocab_size,
                        "hf_bytes": size, "fp32_params": size // 4},
              "build_hf_seconds": build_s, "round_trip_bit_exact": exact, "rows": rows,
              "launcher_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__}
    out = REPO / "benchmarks" / "results" / "convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"model: {size / 1e9:.2f} GB fp32 ({size // 4 / 1e6:.0f}M params), built in {build_s:.0f} s; "
          f"round trip bit-exact: {exact}")
    print(f"{'step':<24}{'ranks':>6}{'GB':>7}{'s':>7}{'GB/s':>7}{'work s':>8}{'work GB/s':>10}{'peak RSS/rank GiB':>19}")
    for r in rows:
        print(f"{r['step']:<24}{r['ranks']:>6}{r['gb']:>7.2f}{r['seconds']:>7.1f}{r['gb_per_s']:>7.3f}"
              f"{r['work_seconds']:>8.1f}{r['work_gb_per_s']:>10.3f}{r['peak_rss_gib']:>19.2f}")
    print(f"launcher peak RSS {result['launcher_peak_rss_gib']:.2f} GiB; wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

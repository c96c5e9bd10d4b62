"""Trainer offload for colocation, measured: memory freed and bit-identical restore.

    python benchmarks/offload_gpu.py                  # one CUDA GPU (megatron-core + torch, no TE/vLLM)
    python benchmarks/offload_gpu.py --device cpu     # the same sequence on CPU, tiny model (~10 s)
    python benchmarks/offload_gpu.py --device cpu --dtype bf16 --rows 2 --seq 32   # master shards too

One process, TP=PP=DP=1. It builds a policy TrainEngine (bf16 on GPU, so the distributed
optimizer holds fp32 master shards; fp32 on CPU), trains one step so the Adam moments exist, then:

1. device memory held (``torch.cuda.memory_allocated``; on CPU the bytes of all live tensors,
   :func:`~megatron_tppo.training.offload.live_tensor_bytes`), before and after ``offload()``:
   the goal is >= 90% freed;
2. ``onload()``, then parameters, main grads, master shards and Adam state compared bit for bit
   with a snapshot taken before the offload (:func:`~megatron_tppo.training.offload.engine_snapshot`);
3. one more step, compared with an engine from the same seed that never offloaded (exact on CPU;
   on GPU exact as far as the kernels are deterministic, so the largest difference is reported).

The checks and the offload are the code that tests/distributed/test_colocate.py runs on CPU.
Prints one JSON object to stdout (also written to --out); exits 1 if a goal is missed. The
libraries' own output (megatron-core, torch) goes to the .log beside --out
(:func:`megatron_tppo.console.quiet_process`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "tiny": dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
                 vocab_size=1024, max_position_embeddings=512),
    "350m": dict(num_layers=24, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=8,
                 vocab_size=32000, max_position_embeddings=2048),
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=8,
               vocab_size=32000, max_position_embeddings=2048),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(rows: int, seq: int, vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq // 4, seq + 1, (rows,), generator=g)
    lengths[0] = seq
    attn = (torch.arange(seq)[None] < lengths[:, None]).float()
    loss_mask = attn.clone()
    loss_mask[:, :8] = 0
    return {"tokens": torch.randint(0, vocab, (rows, seq), generator=g) * attn.long(), "attention_mask": attn,
            "loss_mask": loss_mask, "old_logprobs": (-5.0 + torch.randn(rows, seq, generator=g)) * loss_mask,
            "advantages": torch.randn(rows, seq, generator=g)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default=None, choices=list(SIZES), help="default: 350m on cuda, tiny on cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "offload_gpu.json"))
    args = ap.parse_args()
    from megatron_tppo.console import quiet_process

    log = Path(args.out).with_suffix(".log")
    stdout = os.fdopen(os.dup(1), "w")  # for the JSON: quiet_process points fd 1 at the log
    console = quiet_process(log)
    console.write(f"[offload_gpu] library output (megatron-core, torch): {log}\n")
    cuda = args.device == "cuda"
    size = args.size or ("350m" if cuda else "tiny")
    if cuda:  # before CUDA initializes: deterministic cuBLAS, so the step comparison can be exact
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    import functools

    import torch

    from megatron_tppo.algorithms.objectives import policy_objective
    from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
    from megatron_tppo.training import TrainEngine, destroy_parallel, init_parallel
    from megatron_tppo.training.offload import engine_snapshot, live_tensor_bytes, snapshot_mismatches

    if cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    init_parallel(1, 1, args.device)
    model = ModelConfig(**SIZES[size], params_dtype=args.dtype or ("bf16" if cuda else "fp32"))
    layout = LayoutConfig(micro_batch_tokens=args.rows * args.seq // 2)
    optim = OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0)
    loss = functools.partial(policy_objective, entropy_coef=0.01)
    batch = make_batch(args.rows, args.seq, model.vocab_size)
    n = float(batch["loss_mask"].sum())

    def held(engine, extra=()) -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return live_tensor_bytes("cpu", exclude=[*engine._offloader.host_buffers, *extra])

    t0 = time.perf_counter()
    eng = TrainEngine(model, layout, optim, role="policy", device=args.device, seed=1, total_steps=10)
    build_s = time.perf_counter() - t0
    step1 = eng.train_step(batch, loss, n, with_entropy=True)
    snap = engine_snapshot(eng)  # host copies
    before = held(eng, snap.values())
    off = eng.offload()
    after = held(eng, snap.values())
    on = eng.onload()
    restored = held(eng, snap.values())
    mismatches = snapshot_mismatches(snap, engine_snapshot(eng))
    del snap

    # the next step equals one of an engine that never offloaded
    ref = TrainEngine(model, layout, optim, role="policy", device=args.device, seed=1, total_steps=10)
    ref1 = ref.train_step(batch, loss, n, with_entropy=True)
    step2, ref2 = eng.train_step(batch, loss, n, with_entropy=True), ref.train_step(batch, loss, n, with_entropy=True)
    a, b = engine_snapshot(eng), engine_snapshot(ref)
    param_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if k.startswith("param/"))
    step_mismatches = snapshot_mismatches(a, b)

    freed = (before - after) / max(before, 1)
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "size": size, "params_dtype": model.params_dtype,
        "parameters": sum(p.numel() for p in eng.module.parameters()), "build_s": build_s,
        "held_bytes_before": before, "held_bytes_after_offload": after, "held_bytes_after_onload": restored,
        "freed_fraction": freed, "offload": off, "onload": on,
        "offload_gb_per_s": off["bytes"] / max(off["seconds"], 1e-9) / 1e9,
        "onload_gb_per_s": on["bytes"] / max(on["seconds"], 1e-9) / 1e9,
        "restore_mismatches": mismatches[:10], "restore_bit_identical": not mismatches,
        "step1_loss": step1["loss"], "ref_step1_loss": ref1["loss"],
        "step2_loss": step2["loss"], "ref_step2_loss": ref2["loss"], "step2_param_max_abs_diff": param_diff,
        "step2_bit_identical": not step_mismatches and step2["loss"] == ref2["loss"],
    }
    stdout.write(json.dumps(res, indent=1) + "\n")
    stdout.flush()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    destroy_parallel()
    ok = freed >= 0.9 and not mismatches and (res["step2_bit_identical"] or cuda)
    if not ok:
        console.write(f"FAILED: freed {freed:.1%} (goal >= 90%), restore mismatches {len(mismatches)}, "
                      f"step2 identical {res['step2_bit_identical']}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The parts of tools/gpu_check.py (the offload part: tools/gpu_check_offload.py) and their helpers.

Each ``part_<name>(device, work) -> dict`` runs in a subprocess of its own (``gpu_check.py
--run-part``) and returns its measurements with ``ok`` and ``reason`` (:class:`Checks`). Imports
at module level are the standard library only; torch, megatron-core and the repository are
imported inside the functions, in the part's process.
"""
from __future__ import annotations

import gc
import inspect
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

TIMEOUT_S = dict(env=60, ipc=90, transfer_group=120, offload=240, startup=240, checkpoint=180, init_cost=120)
MiB = 1 << 20
ENGINE_FRACTION = 0.85  # of the GPU's total memory, as vLLM's gpu_memory_utilization reserves it
LAYER_32B = dict(hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40, num_query_groups=8)  # Qwen2.5-32B


class Checks:
    """Named pass/fail conditions of one part; the failed ones make its reason."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, ok, detail="") -> bool:
        if not ok:
            self.failed.append(f"{name} ({detail})" if detail != "" else name)
        return bool(ok)

    def result(self, **measured) -> dict:
        return {"ok": not self.failed, "reason": "; ".join(self.failed) or None, **measured}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(device: str) -> dict:
    """Memory now: CUDA: the device's free/used (all processes) and this process's allocator; RSS."""
    import torch

    from megatron_tppo.weights.memprobe import rss_bytes

    if device != "cuda":
        return {"rss_bytes": rss_bytes()[0]}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"free_bytes": free, "used_bytes": total - free, "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(), "rss_bytes": rss_bytes()[0]}


def require(device: str) -> None:
    """Fail early without a GPU; on CUDA create this process's context before any baseline."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no GPU")
        torch.cuda.set_device(0)
        torch.empty(1, device="cuda")


def timed(fn, *args, **kwargs):  # -> (fn's result, its wall seconds)
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def settle(device: str) -> None:  # drop garbage; on CUDA hand the allocator's cached blocks back to the driver
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_ranks(target, world: int, args: tuple, timeout_s: float, work: Path) -> tuple[list[dict], str]:
    """``target(rank, world, *args) -> dict`` in ``world`` spawned processes: (results by rank, their
    errors). A rank that raises gives {"error": ...}; the others then get 5 s, then are killed."""
    import multiprocessing as mp

    ctx, deadline = mp.get_context("spawn"), time.time() + timeout_s
    files = [work / f"{target.__name__}_{r}.json" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(f, target, r, world, args), daemon=True) for r, f in enumerate(files)]
    for p in procs:
        p.start()
    while time.time() < deadline and any(p.is_alive() for p in procs):
        if any(p.exitcode for p in procs):
            deadline = min(deadline, time.time() + 5)
        time.sleep(0.1)
    killed = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
        p.join(5)
    res = [json.loads(f.read_text()) if f.exists() else
           {"error": f"no result within {timeout_s:.0f} s (killed)" if k else f"exited with code {p.exitcode}"}
           for f, p, k in zip(files, procs, killed)]
    return res, "; ".join(f"rank {r}: {x['error']}" for r, x in enumerate(res) if "error" in x)


def _rank_main(path: Path, target, rank: int, world: int, args: tuple) -> None:
    try:
        path.write_text(json.dumps(target(rank, world, *args), default=str))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        path.write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}))
        sys.exit(1)


def part_env(device: str, work: Path) -> dict:
    import importlib.metadata as md

    import torch

    have = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           **{k.replace("-", "_"): have.get(k) for k in ("megatron-core", "numpy", "psutil", "transformer-engine")},
           "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_total_bytes=p.total_memory,
                   capability=f"{p.major}.{p.minor}", nccl=".".join(map(str, torch.cuda.nccl.version())))
    return {"ok": True, "reason": None, **env}


def _ipc_rank(rank: int, world: int, device: str, address: tuple, bucket_bytes: int) -> dict:
    import torch

    from megatron_tppo.weights import ipc, transfer, transports

    require(device)
    cuda = device == "cuda"
    transport = transports.join("ipc", rank, world, address=address, timeout_s=60)
    group = transport.group
    g = torch.Generator(device=device).manual_seed(1234)  # 3 buckets, the same in every process, uneven sizes
    data = [[(f"bucket{b}.t{i}", torch.randn(bucket_bytes // 3 // dt.itemsize - 7 * (i + b), generator=g,
                                             device=device).to(dt))
             for i, dt in enumerate((torch.bfloat16, torch.float32, torch.float16))] for b in range(3)]
    settle(device)
    group.ack(1)  # every process has its CUDA context and its data: the baseline
    base = memory(device)
    c = Checks()
    if rank == 0:
        stats = transfer.send_buckets(transport, data)
        res = {"sent": stats.as_dict(), "baseline": base, "after_send": memory(device)}  # (blocks in IPC limbo)
        group.ack(0)  # the receivers dropped their views
        gc.collect()
        if cuda:
            torch.cuda.ipc_collect()
            res["after_ipc_collect"] = memory(device)
            settle(device)
            res["after_empty_cache"] = memory(device)
            res["max_allocated_over_baseline"] = torch.cuda.max_memory_allocated() - base["allocated_bytes"]
            over = res["after_ipc_collect"]["allocated_bytes"] - base["allocated_bytes"]
            c("allocated back to baseline after ipc_collect", over == 0, f"{over} bytes over")
            short = base["free_bytes"] - res["after_empty_cache"]["free_bytes"]
            c("device free memory back to baseline (64 MiB)", short <= 64 * MiB, f"{short} bytes short")
        left = [f for f in os.listdir(ipc._shm_dir()) if f.startswith(f"tppo_weights_{os.getpid()}_")]
        c("no /dev/shm file left", not left, left)
        group.ack(0)  # the receivers measure after the sender's clean-up
    else:
        expected = {name: t for bucket in data for name, t in bucket}
        stats, bad, seen, grow = transports.TransferStats(), [], 0, 0
        for name, view in transfer.receive(transport, stats, torch.device("cuda", 0) if cuda else None):
            seen, want = seen + 1, expected[name]
            if view.dtype != want.dtype or view.shape != want.shape or not torch.equal(
                    view.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                bad.append(name)
            grow = max(grow, torch.cuda.memory_allocated() - base["allocated_bytes"]) if cuda else None
            del view
        settle(device)
        group.ack(1)
        group.ack(0)
        c("exact", not bad and seen == len(expected), f"{len(bad)} mismatched, {seen}/{len(expected)} seen")
        c("zero copy", not cuda or grow < bucket_bytes // 2, f"{grow} bytes allocated while mapped")
        res = {"received": stats.as_dict(), "tensors_seen": seen, "mismatched": bad,
               "allocated_growth_while_mapped": grow, "end": memory(device)}
    group.close()
    return {**res, "failed": c.failed}


def part_ipc(device: str, work: Path) -> dict:
    from megatron_tppo.weights.transports import open_store

    c, bucket, store = Checks(), 256 * MiB if device == "cuda" else 4 * MiB, open_store("127.0.0.1", 0, timeout_s=60)
    ranks, err = run_ranks(_ipc_rank, 4, (device, ("127.0.0.1", store.port), bucket), TIMEOUT_S["ipc"] - 15, work)
    if c("all ranks finished", not err, err):
        c.failed += [f"{'sender' if r == 0 else f'receiver {r}'}: {f}" for r, res in enumerate(ranks)
                     for f in res["failed"]]
    return c.result(bucket_bytes=bucket, receivers=3, sender=ranks[0], receiver_results=ranks[1:])


def _group_rank(rank: int, world: int, device: str, address: tuple, backend: str) -> dict:
    import torch

    from megatron_tppo.weights.transports import join

    require(device)
    transport, joined_s = timed(join, backend, rank, world, address=address, timeout_s=45)
    group = transport.group
    want = torch.arange(MiB // 4, dtype=torch.int32, device=group.device)
    # NCCL makes its communicator at the first collective
    got, first_s = timed(group.broadcast, want.clone() if rank == 0 else torch.zeros_like(want))
    acked, obj = group.ack(1), group.broadcast_object({"from": 0, "n": 7} if rank == 0 else None)
    group.close()
    return {"join_s": joined_s, "first_collective_s": first_s, "ack_sum": acked, "object": obj,
            "broadcast_exact": bool(torch.equal(got, want))}


def part_transfer_group(device: str, work: Path) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_tppo.weights.transports import open_store

    backend, c = ("nccl" if device == "cuda" else "gloo"), Checks()
    # world 1 in this process, beside a default group of the same backend (as beside megatron's)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend)
    dist.all_reduce(x := torch.ones(4, device=device))
    store = open_store("127.0.0.1", 0, timeout_s=45)  # (kept referenced while the group lives)
    one = _group_rank(0, 1, device, ("127.0.0.1", store.port), backend)
    dist.all_reduce(x)  # the default group still works after the transfer group's life
    c("world 1 exact", one["broadcast_exact"] and one["ack_sum"] == 1 and one["object"] == {"from": 0, "n": 7}, one)
    c("default group unaffected", bool((x == 1).all()), x.tolist())
    dist.destroy_process_group()
    store = open_store("127.0.0.1", 0, timeout_s=45)
    two, err = run_ranks(_group_rank, 2, (device, ("127.0.0.1", store.port), backend), 75, work)
    if device == "cuda":  # NCCL is expected to refuse two ranks on one GPU: why colocated engines use ipc
        outcome = "worked" if not err else ("hung" if "no result within" in err else "refused")
        return c.result(backend=backend, world1=one, same_gpu_world2={"outcome": outcome, "detail": err[:600] or two})
    if c("world 2 finished", not err, err):
        c("world 2 exact", all(r["broadcast_exact"] and r["ack_sum"] == 2 for r in two), two)
    return c.result(backend=backend, world1=one, world2=two)


def build_engine(device: str, big: bool, seed: int = 1, **engine_kwargs):
    """(engine, train-step callable): bf16 policy, world 1, DDP + distributed optimizer; 1.2B/350M | tiny."""
    from megatron.core import parallel_state as ps

    from benchmarks.offload_gpu import SIZES, make_batch
    from megatron_tppo.algorithms.objectives import policy_objective
    from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
    from megatron_tppo.training import TrainEngine, init_parallel

    if not ps.model_parallel_is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        init_parallel(1, 1, device)
    rows, seq = (8, 512) if device == "cuda" else (2, 32)
    size = (dict(SIZES["1b"], num_layers=24) if big else SIZES["350m"]) if device == "cuda" else SIZES["tiny"]
    model = ModelConfig(**size, params_dtype="bf16")
    eng = TrainEngine(model, LayoutConfig(micro_batch_tokens=rows * seq // 2), OptimizerConfig(
        lr=1e-4, weight_decay=0.1, clip_grad=1.0), role="policy", device=device, seed=seed, total_steps=10,
        **engine_kwargs)
    batch = make_batch(rows, seq, model.vocab_size)
    n = float(batch["loss_mask"].sum())
    loss = lambda out, mb, count: policy_objective(out, mb, count, entropy_coef=0.01)  # noqa: E731
    return eng, lambda: eng.train_step(batch, loss, n, with_entropy=True)["loss"]



def _holder(conn, device: str, nbytes: int) -> None:
    """The engine stand-in: "reserve" allocates ``nbytes`` (1 GiB chunks), "sleep" frees it."""
    import torch

    require(device)
    held: list = []
    while (cmd := conn.recv()) != "exit":
        t0 = time.perf_counter()
        try:
            if cmd == "reserve":  # CPU: ones, so that the pages are resident
                fill, chunk = (torch.empty if device == "cuda" else torch.ones), 1024 * MiB
                held += [fill(min(chunk, nbytes - i), dtype=torch.uint8, device=device)
                         for i in range(0, nbytes, chunk)]
            else:
                held.clear()
                settle(device)
            conn.send({"ok": True, "seconds": time.perf_counter() - t0, **memory(device)})
        except Exception as e:  # noqa: BLE001 - the trainer side records it
            held.clear()
            conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"[:400], **memory(device)})


def part_startup(device: str, work: Path) -> dict:
    import multiprocessing as mp

    import torch

    from megatron_tppo.training import TrainEngine
    from megatron_tppo.training.checkpoint import load_checkpoint, save_checkpoint

    cuda, c, trace = device == "cuda", Checks(), []
    # the starting weights, saved before the sequence (not part of it; the model only, no optimizer)
    eng, _ = build_engine(device, True, with_optimizer=False)
    prepare_s = timed(save_checkpoint, eng, str(work / "policy"), with_optimizer=False)[1]
    del eng, _
    settle(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peaks below: since this baseline
    # built as the controller builds at start-up: without a random initialization, where the engine offers it
    skip = {"init_weights": False} if "init_weights" in inspect.signature(TrainEngine).parameters else {}
    nbytes = int(ENGINE_FRACTION * torch.cuda.mem_get_info()[1]) if cuda else 256 * MiB
    conn, end = (ctx := mp.get_context("spawn")).Pipe()
    holder = ctx.Process(target=_holder, args=(end, device, nbytes), daemon=True)
    peak = (lambda: torch.cuda.max_memory_allocated()) if cuda else (lambda: None)

    def note(step: str, **kw) -> None:
        trace.append({"step": step, **memory(device), **kw})

    def engine(cmd: str) -> dict:
        conn.send(cmd)
        if not conn.poll(60):
            raise TimeoutError(f"the engine stand-in did not answer {cmd!r} in 60 s")
        c(f"engine {cmd} after {trace[-1]['step']}", (r := conn.recv())["ok"], r.get("error"))
        return r

    note("baseline")
    holder.start()
    try:
        note("engine_reserved", engine=engine("reserve"))
        note("engine_asleep", engine=engine("sleep"))
        (eng, step), s = timed(build_engine, device, True, **skip)
        note("trainer_built", seconds=s, init_weights=not skip, peak_allocated_bytes=peak())
        _, s = timed(load_checkpoint, eng, str(work / "policy"), with_optimizer=False)  # as checkpoint.load_policy
        note("trainer_loaded", seconds=s, peak_allocated_bytes=peak())
        loss, s = timed(step)
        note("trainer_stepped", seconds=s, loss=loss, peak_allocated_bytes=peak())
        c("a finite loss after the load", abs(loss) < float("inf"), loss)
        note("trainer_offloaded", offload=eng.offload())
        note("engine_woken", engine=engine("reserve"))
        conn.send("exit")
    finally:
        holder.join(5)
        holder.kill()
    res = {"engine_reserve_bytes": nbytes, "prepare_save_s": prepare_s, "trace": trace}
    if cuda:  # computed from the measurements above, not run: why the engine must sleep first
        by = {t["step"]: t for t in trace}
        need = by["trainer_stepped"]["peak_allocated_bytes"]  # (the peak since the baseline)
        res.update(engine_fraction=ENGINE_FRACTION, trainer_peak_allocated_bytes=need,
                   computed_fits_beside_awake_engine=need <= by["engine_reserved"]["free_bytes"],
                   trainer_resident_while_engine_awake=by["trainer_offloaded"]["used_bytes"]
                   - by["engine_asleep"]["used_bytes"])
    return c.result(**res)


def part_checkpoint(device: str, work: Path) -> dict:
    from megatron_tppo.training.offload import engine_snapshot, snapshot_mismatches

    c, (eng, step) = Checks(), build_engine(device, False, seed=1)
    step()
    _, save_s = timed(eng.save, str(work / "ckpt"), with_optimizer=True)
    disk = sum(f.stat().st_size for f in (work / "ckpt").rglob("*") if f.is_file())
    other, _ = build_engine(device, False, seed=2)
    _, load_s = timed(other.load, str(work / "ckpt"), with_optimizer=True)
    bad = snapshot_mismatches(engine_snapshot(eng), engine_snapshot(other))
    c("loaded = saved, bit for bit (parameters, master shards, Adam; gradients are not saved)",
      not [k for k in bad if not k.startswith("main_grad/")], bad[:5])
    c("steps restored", other.steps == eng.steps == 1, (other.steps, eng.steps))
    return c.result(parameters=sum(p.numel() for p in eng.module.parameters()), save_s=save_s, load_s=load_s,
                    checkpoint_bytes=disk, save_gb_per_s=disk / max(save_s, 1e-9) / 1e9,
                    load_gb_per_s=disk / max(load_s, 1e-9) / 1e9)


def part_init_cost(device: str, work: Path) -> dict:
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from megatron_tppo.config import ModelConfig
    from megatron_tppo.models.gpt import layer_spec, transformer_config
    from megatron_tppo.training import init_parallel

    cuda, scale = device == "cuda", 1 if device == "cuda" else 4
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(1, 1, device)
    dims = {k: v // scale for k, v in LAYER_32B.items()}
    # built where use_cpu_initialization builds it, on the CPU; the CUDA move is timed on its own
    cfg = transformer_config(ModelConfig(num_layers=1, vocab_size=128, params_dtype="bf16", **dims), 1, 1, "cpu")
    runs, layer = [], None
    for _ in range(2):
        del layer
        gc.collect()
        layer, s = timed(build_module, layer_spec("cpu", seed=1), config=cfg, layer_number=1)
        runs.append(s)
    params = sum(p.numel() for p in layer.parameters())
    move_s = timed(lambda: (layer.cuda(), torch.cuda.synchronize()))[1] if cuda else None

    def count(h: int, f: int, heads: int, groups: int) -> int:  # QKV (+bias), projection, gated MLP, 2 RMSNorms
        qkv = h + 2 * groups * (h // heads)
        return h * qkv + qkv + h * h + 2 * h * f + f * h + 2 * h

    expect, params_32b, c = count(*dims.values()), count(*LAYER_32B.values()), Checks()
    c("layer parameters as computed", params == expect, (params, expect))
    per_layer = min(runs) * params_32b / params
    res = {"layer_dims": dims, "layer_parameters": params, "layer_parameters_32b": params_32b, "build_s": runs,
           "torch_threads": torch.get_num_threads(), "move_to_gpu_s": move_s,
           ("layer_32b_s" if cuda else "extrapolated_layer_32b_s"): per_layer,
           "extrapolated_64_layers_s_by_pp": {pp: per_layer * 64 / pp for pp in (1, 2, 4, 8)},
           "extrapolation": None if cuda else (f"measured at 1/{scale} of the width ({params} parameters), scaled "
                                               f"linearly to the 32B layer's {params_32b}: an estimate, not measured")}
    return c.result(**res)

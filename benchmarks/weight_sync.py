"""Weight sync end to end (gather, transfer, engine load): seconds, GB/s and memory per model size.

For each model size and engine tensor-parallel size: a random Qwen2-style model (made offline),
a real policy trainer (megatron-core on gloo, TP ``--policy-tp``) and a real vLLM engine started
from other random weights, colocated on the policy's GPUs, on a local Ray cluster. The paths, in
the same run, on the same actors (:mod:`megatron_tppo.weight_route`):

* ``local`` (``rollout.weight_transport=auto``: every engine worker's GPU holds a policy rank):
  each policy rank TP-gathers the model bucket by bucket inside the trainer and hands each bucket
  to the engine worker on its own GPU through shared memory (CUDA IPC on a GPU); only handles
  cross the transfer groups.
* ``direct`` (``rollout.weight_transport=gloo``, the broadcast route): the policy's TP-rank-0
  gathers tensor by tensor and broadcasts size-bounded buckets over one gloo group straight into
  every engine worker (host-staged on a GPU).
* ``driver`` (the path before transfer groups): the whole stage is gathered and returned to the
  driver, put in the object store, and each engine streams it in (through its workers over a local
  group when it has worker processes). It lives only here: run on the actors through Ray's
  ``__ray_call__`` with the two functions below.

Reference: a memcpy of the same bytes in the driver process (the ceiling of any host transfer).
Memory: the peak resident-set growth during a sync of the driver, of each sender (policy rank) and
of each receiver (the engine's process at TP=1, its worker processes at TP>1), from
/proc/self/clear_refs + VmHWM; plus the direct path's own count of transfer buffers alive at once
in a receiver. The driver must not grow with the model on the direct path.

    .venv/bin/python benchmarks/weight_sync.py                  # all sizes up to ~1.1 GB, policy TP2, engine TP2
    .venv/bin/python benchmarks/weight_sync.py --sizes xs --repeats 1   # a quick check

Prints a table and writes benchmarks/results/weight_sync.json; the library output of the workers
(megatron-core, vLLM) goes to ``<run-dir>/logs/`` (:func:`megatron_tppo.console.start_run_logs`).
The 1 GB size needs about 10 GB of RAM (policy with Adam states ~4x the model, engine, and the
driver path's copies) and a quiet machine: on 2 cores each size takes minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (layers, hidden, ffn, heads, kv groups, vocab); untied, fp32 (bytes ~ 4 x params)
SIZES = {
    "xs": (2, 256, 704, 4, 2, 512),          # ~7 MB
    "s": (8, 512, 1408, 8, 2, 8192),         # ~125 MB
    "m": (8, 1024, 2816, 16, 4, 32000),      # ~625 MB
    "l": (18, 1024, 2816, 16, 4, 32000),     # ~1.07 GB
}


def make_cfg(size: str, engine_tp: int, bucket_mb: int, extra: tuple = (), policy_tp: int = 2):
    from megatron_tppo.config_io import load_config

    layers, hidden, ffn, heads, groups, vocab = SIZES[size]
    return load_config(str(REPO / "examples/tiny_cpu.yaml"), [
        f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}", f"model.vocab_size={vocab}",
        "model.max_position_embeddings=128", "model.tie_word_embeddings=false", "rollout.num_engines=1",
        f"rollout.tensor_parallel={engine_tp}", f"rollout.weight_sync_bucket_mb={bucket_mb}", "rollout.colocate=true",
        f"parallel.policy.tensor_parallel={policy_tp}",
        "rollout.cpu_kv_cache_gb=1", *extra])


def memcpy_gb_per_s(nbytes: int, repeats: int = 3) -> float:
    """Best of ``repeats`` copies of ``nbytes`` between two host buffers (pages touched first)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


class MemoryProbe:
    """Peak RSS growth of the driver, the policy ranks and the engine processes during a block."""

    def __init__(self, policy, rollout):
        self.policy, self.rollout = policy, rollout

    def __enter__(self):
        import ray

        from megatron_tppo.weights.memprobe import reset_peak_rss, rss_bytes

        self.driver0 = rss_bytes()[0]
        reset_peak_rss()
        self.senders0 = ray.get([w.memory.remote(True) for w in self.policy.workers])
        self.engines0 = ray.get([w.memory.remote(True) for w in self.rollout.workers])
        return self

    def __exit__(self, *exc):
        import ray

        from megatron_tppo.weights.memprobe import rss_bytes

        self.driver_growth = rss_bytes()[1] - self.driver0
        after = ray.get([w.memory.remote() for w in self.policy.workers])
        self.sender_growth = [a["rss_peak_bytes"] - b["rss_bytes"] for a, b in zip(after, self.senders0)]
        engines = ray.get([w.memory.remote() for w in self.rollout.workers])
        self.receiver_growth = []
        for a, b in zip(engines, self.engines0):
            if a["workers"]:  # the worker processes receive; the engine's own process only relays
                self.receiver_growth += [x["rss_peak_bytes"] - y["rss_bytes"] for x, y in zip(a["workers"], b["workers"])]
            else:
                self.receiver_growth.append(a["rss_peak_bytes"] - b["rss_bytes"])

    def as_dict(self) -> dict:
        mb = 2 ** 20
        return {"driver_growth_mb": self.driver_growth / mb, "sender_growth_mb": [g / mb for g in self.sender_growth],
                "receiver_growth_mb": [g / mb for g in self.receiver_growth]}


def check_engine(rollout, policy, seqs) -> float:
    """Largest |vLLM - megatron| prompt log-prob after a sync (the sync really happened)."""
    import ray

    width = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    want = policy.forward({"tokens": tokens, "attention_mask": (tokens >= 0).long()})["logprobs"]
    got = ray.get(rollout.workers[0].call.remote("prompt_logprobs", seqs))
    return max((torch.tensor(g, dtype=torch.float64) - want[i, 1:len(s)].double()).abs().max().item()
               for i, (g, s) in enumerate(zip(got, seqs)))


def _stage_weights(worker, dtype: str) -> list:
    """(Inside a policy rank) this stage's (megatron name, full tensor) on its TP-0 / DP-0 rank."""
    from megatron_tppo.weights.gather import iter_full_params

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    full = iter_full_params(worker.engine.module, worker.engine.tp_group, dtype=dt)
    keep = worker.info.tp_rank == 0 and worker.info.dp_rank == 0
    return [(n, t.cpu()) for n, t in full] if keep else [None for _ in full]


def _engine_load(worker, named: list, version: int, model_cfg, bucket_mb: int) -> dict:
    """(Inside an engine actor) stream full megatron tensors into its engine in HF buckets."""
    from megatron_tppo.weights.buckets import sync_weights

    stats = sync_weights(worker.engine, iter(named), model_cfg, version, bucket_mb << 20)
    return {"bytes": stats.bytes, "buckets": stats.buckets, "seconds": stats.seconds}


def driver_sync(policy, rollout, cfg, version: int, bucket_mb: int) -> tuple[dict, float]:
    """The driver path: (engine 0's load stats, gather seconds)."""
    import ray

    t0 = time.perf_counter()
    parts = ray.get([w.__ray_call__.remote(_stage_weights, cfg.model.params_dtype) for w in policy.workers])
    named = [x for part in parts for x in part if x is not None]
    gather = time.perf_counter() - t0
    ref = ray.put(named)
    del named, parts
    st = ray.get([w.__ray_call__.remote(_engine_load, ref, version, cfg.model, bucket_mb) for w in rollout.workers])
    return st[0], gather


def run_one(size: str, engine_tp: int, bucket_mb: int, repeats: int, paths: list[str], workdir: Path,
            policy_tp: int = 2) -> list[dict]:
    from megatron_tppo.controller.groups import RolloutGroup, TrainerGroup
    from megatron_tppo.controller.ray_placement import PlacedCluster, plan_for_cluster
    from megatron_tppo.controller.weight_sync import WeightSync
    from megatron_tppo.weights.hf_config import save_random_hf_model

    cfg = make_cfg(size, engine_tp, bucket_mb, policy_tp=policy_tp)
    policy_dir, engine_dir = workdir / f"{size}_policy", workdir / f"{size}_engine"
    for d, seed in ((policy_dir, 1), (engine_dir, 2)):
        if not (d / "config.json").exists():
            save_random_hf_model(cfg.model, d, seed=seed)
    plan, on_gpus = plan_for_cluster(cfg, "cpu")
    placed = PlacedCluster(plan, on_gpus)
    parts: list = [placed]
    rows = []
    try:
        t0 = time.perf_counter()
        rollout = RolloutGroup("vllm", str(engine_dir), cfg.rollout, cfg.model, placed=placed)
        parts.append(rollout)
        engine_start = time.perf_counter() - t0
        policy = TrainerGroup("policy", cfg.model, cfg.parallel.policy, cfg.optim.policy, role="policy",
                              device="cpu", seed=0, total_steps=1, placed=placed)
        parts.append(policy)
        policy.load_hf(str(policy_dir))
        seqs = [[(7 * i + j) % cfg.model.vocab_size for j in range(24)] for i in range(2)]
        version = 0
        for path in [x for x in ("local", "direct") if x in paths]:
            transport = ("rollout.weight_transport=gloo",) if path == "direct" else ()
            t0 = time.perf_counter()
            sync = WeightSync(policy, rollout, make_cfg(size, engine_tp, bucket_mb, transport, policy_tp),
                              placement=plan)
            setup = time.perf_counter() - t0
            want = "local" if path == "local" else "broadcast"
            if sync.route.path != want:
                raise SystemExit(f"path {path}: the route is {sync.route.describe()}, expected {want} (engine "
                                 f"workers need a policy rank on their GPUs: --engine-tp <= --policy-tp)")
            try:
                for r in range(repeats + 1):  # the first sync also plans the buckets: warm-up
                    version += 1
                    with MemoryProbe(policy, rollout) as mem:
                        m = sync.sync(version)
                    if r == 0:
                        continue
                    nbytes = int(m["perf/weight_sync_gb"] * 1e9)
                    rows.append(dict(size=size, engine_tp=engine_tp, path=path, repeat=r, bytes=nbytes,
                                     buckets=int(m["perf/weight_sync_buckets"]), seconds=m["perf/weight_sync_s"],
                                     gb_per_s=m["perf/weight_sync_gb_per_s"], gather_s=m["perf/weight_gather_s"],
                                     send_s=m["perf/weight_send_s"], load_s=m["perf/weight_load_s"],
                                     wire_mb=m["perf/weight_sync_wire_mb"], policy_tp=policy_tp,
                                     receiver_buffers_mb=m["mem/weight_sync_receiver_buffers_mb"],
                                     setup_s=setup, engine_start_s=engine_start, **mem.as_dict()))
                err = check_engine(rollout, policy, seqs)
                for row in rows:
                    row.setdefault("max_logprob_err", err)
            finally:
                sync.close()
        if "driver" in paths:
            for r in range(1, repeats + 1):
                version += 1
                with MemoryProbe(policy, rollout) as mem:
                    t0 = time.perf_counter()
                    st, gather = driver_sync(policy, rollout, cfg, version, bucket_mb)
                    wall = time.perf_counter() - t0
                rows.append(dict(size=size, engine_tp=engine_tp, policy_tp=policy_tp, path="driver", repeat=r,
                                 bytes=st["bytes"], buckets=st["buckets"], seconds=wall,
                                 gb_per_s=st["bytes"] / wall / 1e9, gather_s=gather,
                                 load_s=st["seconds"], engine_start_s=engine_start, **mem.as_dict(),
                                 max_logprob_err=check_engine(rollout, policy, seqs)))
        model_bytes = max(r["bytes"] for r in rows)
        ref = memcpy_gb_per_s(model_bytes)
        for row in rows:
            row["memcpy_gb_per_s"] = ref
    finally:
        for part in reversed(parts):
            part.shutdown()
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """The fastest repeat of each (size, engine TP, path)."""
    best: dict = {}
    for r in rows:
        key = (r["size"], r["engine_tp"], r["path"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    return list(best.values())


def print_table(rows: list[dict]) -> None:
    head = (f"{'size':<5}{'TP':>3} {'path':<7}{'MB':>8}{'bkts':>5}{'sync s':>8}{'GB/s':>7}{'memcpy':>8}"
            f"{'driver+MB':>10}{'sender+MB':>10}{'recv+MB':>9}{'recvbuf':>8}{'|Δlogp|':>9}")
    print(f"\n{head}\n{'-' * len(head)}")
    for r in rows:
        recv_buf = f"{r['receiver_buffers_mb']:>8.1f}" if "receiver_buffers_mb" in r else f"{'-':>8}"
        print(f"{r['size']:<5}{r['engine_tp']:>3} {r['path']:<7}{r['bytes'] / 2**20:>8.1f}{r['buckets']:>5}"
              f"{r['seconds']:>8.2f}{r['gb_per_s']:>7.2f}{r['memcpy_gb_per_s']:>8.2f}{r['driver_growth_mb']:>10.1f}"
              f"{max(r['sender_growth_mb']):>10.1f}{max(r['receiver_growth_mb']):>9.1f}{recv_buf}"
              f"{r['max_logprob_err']:>9.1e}")
    print("driver+/sender+/recv+: peak resident-set growth during one sync (max over processes); recvbuf: most "
          "transfer buffers a receiver held at once; |Δlogp|: vLLM vs megatron after the sync")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--engine-tp", nargs="+", type=int, default=[2])
    p.add_argument("--policy-tp", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=["local", "direct", "driver"], choices=["local", "direct", "driver"])
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the random models are written (default: a temp dir)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "weight_sync.json"))
    p.add_argument("--run-dir", default="runs/bench_weight_sync", help="its logs/ gets the library output")
    a = p.parse_args()
    from megatron_tppo.console import start_run_logs
    from megatron_tppo.controller import cluster

    log_dir = start_run_logs(a.run_dir)
    print(f"[weight_sync] library output (megatron-core, vLLM, Ray workers): {log_dir.resolve()}", flush=True)
    started = cluster.connect(num_cpus=8)
    rows: list = []
    try:
        with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
            for size in a.sizes:
                for tp in a.engine_tp:
                    print(f"[weight_sync] size {size}, engine TP={tp} ...", flush=True)
                    rows += run_one(size, tp, a.bucket_mb, a.repeats, a.paths, Path(tmp), a.policy_tp)
                for d in Path(tmp).glob(f"{size}_*"):  # the models of this size are done
                    import shutil

                    shutil.rmtree(d)
    finally:
        cluster.shutdown(started)
    table = best_rows(rows)
    print_table(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"bucket_mb": a.bucket_mb, "best": table, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

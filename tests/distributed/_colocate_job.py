"""One rank of the colocation job: ``python -m tests.distributed._colocate_job <job> <out_dir>``.

Jobs (the parent sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT):

- ``ref``  world 1: TP=1, DP=1, one micro-batch per step (fp32, and a bf16 offload check).
- ``pair`` world 2: DP=2 (distributed optimizer sharding Adam), then TP=2, small micro-batches.

Per layout: (1) offload/onload of a policy engine at step 0 and after a step, against an engine
built from the same seed that never offloads (the one host buffer's size, gradients dropped
instead of copied, then the colocated sequence on the reference engine itself); (2)
TrainerWorker forwards (policy log-probs and entropy, critic values), each rank counting the rows
its engine computed. Each rank writes
``<out_dir>/<job>_rank<r>.pt``: {layout: {name: value}}.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys

import torch
import torch.distributed as dist

from megatron_tppo.algorithms.objectives import policy_objective
from megatron_tppo.config import LayoutConfig, OptimizerConfig
from megatron_tppo.controller.workers import TrainerWorker
from megatron_tppo.training import TrainEngine, init_parallel, split_for_data_parallel
from megatron_tppo.training.offload import (
    ALIGN,
    KINDS,
    engine_snapshot,
    engine_tensors,
    live_tensor_bytes,
    snapshot_mismatches,
)
from tests.distributed._worker import MODEL, SEED

BF16 = dataclasses.replace(MODEL, params_dtype="bf16", num_layers=2)

OPTIM = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)
LOSS = functools.partial(policy_objective, entropy_coef=0.01)
B, T = 8, 32


def make_batch() -> dict:
    """8 rows, T=32, lengths 6..32; loss after a 4-token prompt; rollout log-probs made up."""
    g = torch.Generator().manual_seed(11)
    lengths = [32, 7, 20, 14, 29, 6, 25, 11]
    attn = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    loss_mask = attn.clone()
    loss_mask[:, :4] = 0
    return {"tokens": torch.randint(0, MODEL.vocab_size, (B, T), generator=g) * attn.long(),
            "attention_mask": attn, "loss_mask": loss_mask,
            "old_logprobs": (-6.0 + torch.randn(B, T, generator=g)) * loss_mask,
            "advantages": torch.randn(B, T, generator=g)}


def storage_bytes(engine) -> int:
    """Bytes behind the engine's parameter/grad/optimizer tensors (distinct storages)."""
    seen = {}
    for ts in engine_tensors(engine).values():
        for t in ts:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # freed: 0 at 0
    return sum(seen.values())


def kind_storages(engine) -> dict[str, list[int]]:
    """Per kind, the sizes of its distinct live storages; a storage counts under the first kind
    (in KINDS order) that reaches it, as the offloader's does."""
    seen: dict[int, str] = {}
    out: dict[str, list[int]] = {k: [] for k in KINDS}
    tensors = engine_tensors(engine)
    for kind in KINDS:
        for t in tensors[kind]:
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen[st.data_ptr()] = kind
                out[kind].append(st.nbytes())
    return out


def host_layout(sizes: dict[str, list[int]], kinds) -> dict:
    """What one host buffer for ``kinds`` must be: each storage rounded up to ALIGN bytes."""
    ns = [n for k in kinds for n in sizes[k]]
    return {"expected_host": sum(-(-n // ALIGN) * ALIGN for n in ns), "expected_storage": sum(ns),
            "storages": len(ns)}


def host_state(engine) -> dict:
    off = engine._offloader
    bufs = off.host_buffers
    return {"host_bytes": off.host_bytes, "storage_bytes": off.storage_bytes, "buffers": len(bufs),
            "ptr": bufs[0].data_ptr() if bufs else None, "aligned": all(b.data_ptr() % ALIGN == 0 for b in bufs)}


def main_grads_zero(engine) -> bool:
    return all(not p.main_grad.any() for p in engine.module.parameters())


def offload_checks(layout: LayoutConfig, dp: int, dp_rank: int, model=MODEL) -> dict:
    batch = make_batch()
    n = float(batch["loss_mask"].sum())
    local = split_for_data_parallel(batch, dp, dp_rank)
    r: dict = {}
    ref = TrainEngine(model, layout, OPTIM, role="policy", device="cpu", seed=SEED, total_steps=10)
    ref1 = ref.train_step(local, LOSS, n, with_entropy=True)
    base = live_tensor_bytes("cpu")

    eng = TrainEngine(model, layout, OPTIM, role="policy", device="cpu", seed=SEED, total_steps=10)
    # step 0: Adam has no state yet
    snap0 = engine_snapshot(eng)
    st0 = eng.offload()
    r["step0"] = st0
    r["step0_empty"] = storage_bytes(eng) == 0
    eng.onload()
    r["step0_identical"] = snapshot_mismatches(snap0, engine_snapshot(eng)) == []
    del snap0
    m1 = eng.train_step(local, LOSS, n, with_entropy=True)
    r["step1_equal"] = m1 == ref1
    r["step1_metrics"] = m1

    # after a step: parameters, main grads, master shards and Adam moments all live
    full = live_tensor_bytes("cpu", exclude=eng._offloader.host_buffers)  # the step-0 host buffer
    r["engine_bytes"], r["held_bytes"] = full - base, storage_bytes(eng)
    sizes = kind_storages(eng)
    snap = engine_snapshot(eng)
    st = eng.offload()
    r["offload"] = st
    r["host"] = {**host_layout(sizes, KINDS), **host_state(eng)}  # Adam's state appeared: a new buffer
    r["after_bytes"] = live_tensor_bytes("cpu", exclude=eng._offloader.host_buffers + list(snap.values()))
    # every host byte the offload added, counted over all live tensors: only the one buffer
    r["host_added"] = live_tensor_bytes("cpu", exclude=list(snap.values())) - r["after_bytes"]
    r["freed_bytes"] = full - r["after_bytes"]
    r["storages_empty"] = storage_bytes(eng) == 0
    r["offloaded_kinds"] = sorted(eng.offloaded)
    try:
        eng.forward(batch)
        r["refused"] = False
    except RuntimeError:
        r["refused"] = True
    r["onload"] = eng.onload()
    r["identical"] = snapshot_mismatches(snap, engine_snapshot(eng))

    # grads only, then a second full cycle: both in the same buffer
    st_g = eng.offload(params=False, optimizer=False)
    r["grads_only"] = (st_g["bytes"] == st_g["grads_bytes"] > 0,
                       all(p.untyped_storage().nbytes() > 0 for p in eng.module.parameters()))
    eng.onload()
    eng.offload()
    r["cycles_host"] = host_state(eng)
    eng.onload()
    r["identical_after_cycles"] = snapshot_mismatches(snap, engine_snapshot(eng))

    # gradients dropped: nothing copied, zero after onload, and the next step is unchanged
    r["drop"] = eng.offload(grads="drop")
    r["drop_host"] = host_state(eng)
    r["drop_grads_bytes"] = sum(sizes["grads"])
    r["drop_empty"], r["drop_dropped"] = storage_bytes(eng) == 0, sorted(eng.dropped)
    r["drop_onload"] = eng.onload()
    r["drop_mismatches"] = snapshot_mismatches(snap, engine_snapshot(eng))
    r["drop_grads_zero"] = main_grads_zero(eng)
    del snap

    m2, ref2 = eng.train_step(local, LOSS, n, with_entropy=True), ref.train_step(local, LOSS, n, with_entropy=True)
    r["step2_equal"] = m2 == ref2
    r["step2_state_mismatches"] = snapshot_mismatches(engine_snapshot(eng), engine_snapshot(ref))
    r["step2_loss"] = m2["loss"]

    # the colocated sequence on a rank that never offloaded: optimizer off (grads dropped), then
    # the parameters; one buffer of exactly their bytes; then a step equal to one without offload
    sizes = kind_storages(ref)
    a = ref.offload(params=False, grads="drop")
    b = ref.offload()
    r["coloc"] = {"sync": a, "generation": b, **host_layout(sizes, ("params", "optimizer")), **host_state(ref),
                  "grads": sum(sizes["grads"]), "params": sum(sizes["params"]),
                  "optimizer": sum(sizes["optimizer"]), "dropped": sorted(ref.dropped)}
    r["coloc"]["onload"] = ref.onload()
    r["coloc"]["grads_zero"] = main_grads_zero(ref)
    m3, ref3 = ref.train_step(local, LOSS, n, with_entropy=True), eng.train_step(local, LOSS, n, with_entropy=True)
    r["step3_equal"] = m3 == ref3
    r["step3_state_mismatches"] = snapshot_mismatches(engine_snapshot(ref), engine_snapshot(eng))
    return r


def counted(engine, log: list):
    """Wrap ``engine.forward`` to record how many rows each call computes."""
    inner = engine.forward

    def forward(batch, **kw):
        log.append(int(batch["tokens"].shape[0]))
        return inner(batch, **kw)

    engine.forward = forward


def forward_checks(tp: int, micro: int, critic: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    master = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    layout = LayoutConfig(tensor_parallel=tp, micro_batch_tokens=micro)
    batch = make_batch()
    r: dict = {}
    roles = ["policy", "critic"] if critic else ["policy"]
    for role in roles:
        w = TrainerWorker(rank, world)
        w.setup(master, MODEL, layout, OPTIM, role, "cpu", SEED, 10)
        rows: list = []
        counted(w.engine, rows)
        r[f"{role}_part"] = w.forward(batch, with_entropy=role == "policy")
        r[f"{role}_rows_computed"] = sum(rows)
        r["dp_rank"] = w.info.dp_rank
    return r


def main() -> None:
    job, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    res: dict = {}
    if job == "ref":
        info = init_parallel(1, 1, "cpu")
        res["dp1"] = offload_checks(LayoutConfig(micro_batch_tokens=4096), 1, 0)
        res["dp1"].update(forward_checks(1, 4096, critic=True))
        # bf16: the distributed optimizer keeps separate fp32 master shards (slow matmuls on CPU: small)
        res["dp1_bf16"] = offload_checks(LayoutConfig(micro_batch_tokens=4096), 1, 0, BF16)
    elif job == "pair":
        info = init_parallel(1, 1, "cpu")
        res["dp2"] = offload_checks(LayoutConfig(data_parallel=2, micro_batch_tokens=64), info.dp, info.dp_rank)
        res["dp2"].update(forward_checks(1, 64, critic=True))
        init_parallel(2, 1, "cpu")
        res["tp2"] = offload_checks(LayoutConfig(tensor_parallel=2, micro_batch_tokens=64), 1, 0)
        res["tp2"].update(forward_checks(2, 64, critic=False))
    else:
        raise SystemExit(f"unknown job {job!r}")
    torch.save(res, os.path.join(out_dir, f"{job}_rank{dist.get_rank()}.pt"))
    dist.barrier()
    from megatron_tppo.training import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()

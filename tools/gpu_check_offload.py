"""The ``offload`` part of tools/gpu_check.py: a trainer's offload and onload as the run makes them.

One engine (GPT + DDP + distributed optimizer, world 1, bf16: 1.2B parameters on CUDA, the tiny
model on CPU) takes a training step, then:

1. ``controller_cycle``: the policy's moves around a generation, made by the controller's own
   code (``Colocation.enter`` applying the memory schedule's ``transition``; the critic and the
   rollout engines are stand-ins that record the calls made on them), in the schedule's phases
   ``updates -> sync`` (resident -> params: ``offload(params=False, grads="drop")``),
   ``sync -> generation`` (params -> offloaded: ``offload(params=True, grads=False,
   optimizer=False)``), ``generation -> values`` (``onload()``). Checked: the bytes of every move
   per kind, nothing of the engine left on the device in generation, parameters, master shards
   and Adam state bit-identical after the onload, gradients zero, and the next training step
   equal, bit for bit (loss, parameters, gradients, optimizer state), to that of a reference
   engine built alike that never offloaded; that comparison is judged only when the reference
   reproduced the first step exactly (the control: otherwise the device is not deterministic
   enough to say anything about the offload). The host buffer is exactly the cycle's layout
   (``host_bytes - storage_bytes < ALIGN * storages``), page-locked whole on CUDA
   (``pinned_bytes == host_bytes``; no pinning on CPU). Per move: its time and what stays
   resident (CUDA: ``mem_get_info`` and the allocator; CPU: the engine's storage bytes).
2. The default call, ``offload()`` (gradients copied), onload, bit-exact, a step, and a second
   cycle (the host buffer exists then): bytes per kind, times, host and pinned bytes.

On CUDA the part turns on torch's deterministic algorithms (warn only, no NaN fill of new
memory) and cuBLAS's fixed workspace, so that the step comparison can be exact.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from types import SimpleNamespace

from gpu_check_parts import Checks, build_engine, memory, settle, timed

CYCLE = ("updates", "sync", "generation", "values")
"""The schedule's phases the cycle enters: a step's updates, the sync, generation, the next step's values."""


def engine_storage_bytes(eng, device: str) -> int:
    """Bytes of the distinct storages on ``device`` behind the engine's params, grads, optimizer state."""
    from megatron_tppo.training.offload import engine_tensors

    sts = [t.untyped_storage() for ts in engine_tensors(eng).values() for t in ts]
    return sum({st.data_ptr(): st.nbytes() for st in sts if st.device.type == device}.values())


def storage_kinds(eng, device: str) -> dict:
    """Per kind, the distinct storages on ``device`` (a shared one counts for the first kind, as the
    offloader takes it): how many, their bytes, and the bytes the host buffer lays out for them."""
    from megatron_tppo.training.offload import ALIGN, KINDS, engine_tensors

    tensors, seen, out = engine_tensors(eng), set(), {}
    for kind in KINDS:
        n = nbytes = layout = 0
        for t in tensors[kind]:
            st = t.untyped_storage()
            if st.nbytes() and st.device.type == device and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                n, nbytes, layout = n + 1, nbytes + st.nbytes(), layout + -(-st.nbytes() // ALIGN) * ALIGN
        out[kind] = {"storages": n, "bytes": nbytes, "layout_bytes": layout}
    return out


def engine_items(eng, grads: bool = True):
    """(name, tensor) of everything an offload must preserve, read through the model and optimizer
    APIs (the names of ``offload.engine_snapshot``), without copying."""
    import torch

    for name, p in eng.module.named_parameters():
        yield f"param/{name}", p.detach()
        if grads and getattr(p, "main_grad", None) is not None:
            yield f"main_grad/{name}", p.main_grad.detach()
    opts = [] if eng.optimizer is None else list(getattr(eng.optimizer, "chained_optimizers", [eng.optimizer]))
    for i, opt in enumerate(opts):
        for g, group in enumerate(getattr(opt, "shard_fp32_from_float16_groups", [])):
            for j, t in enumerate(group):
                if t is not None:
                    yield f"master/{i}/{g}/{j}", t.detach()
        for idx, state in opt.optimizer.state_dict()["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    yield f"optim/{i}/{idx}/{k}", v.detach()


def host_copy(eng, grads: bool) -> dict:
    return {k: t.to("cpu", copy=True) for k, t in engine_items(eng, grads)}


def mismatches(want: dict, got: dict) -> list[str]:
    """Names missing on one side or not bit-identical (NaN payloads, -0.0); ``want``'s tensors go
    to ``got``'s device one at a time."""
    import torch

    def bits(t):
        return t.contiguous().view(-1).view(torch.uint8)

    bad = sorted(set(want) ^ set(got))
    for k in sorted(set(want) & set(got)):
        a, b = want[k], got[k]
        if a.dtype != b.dtype or a.shape != b.shape or (a.numel() and not torch.equal(bits(a.to(b.device)), bits(b))):
            bad.append(k)
    return bad


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest difference between the parameters of two engines' items."""
    diffs = [(a[k].float() - b[k].float()).abs().max().item() for k in a
             if k.startswith("param/") and k in b and a[k].numel()]
    return max(diffs, default=0.0)


def host_memory(eng, off: dict) -> dict:
    """What the offloader keeps on host: its buffer's size, what it holds, its pinned bytes."""
    import torch

    bufs = [b for b in getattr(eng._offloader, "host_buffers", []) if torch.is_tensor(b)]
    stats = torch.cuda.host_memory_stats() if eng.device == "cuda" and hasattr(torch.cuda, "host_memory_stats") else {}
    return {**{k: off[k] for k in ("host_bytes", "storage_bytes") if k in off},
            "offloader_pinned": getattr(eng._offloader, "pinned", None),
            "host_buffer_bytes": sum(b.untyped_storage().nbytes() for b in bufs),
            "pinned_bytes": sum(b.untyped_storage().nbytes() for b in bufs if b.is_pinned()),
            "torch_host_allocator_bytes": stats.get("allocated_bytes.current")}  # torch's caching host allocator


def top_cuda_tensors(n: int = 6) -> list[dict]:
    """The largest distinct CUDA storages live tensors still hold (what stays resident)."""
    import torch

    live = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_cuda and t.layout == torch.strided]
    seen = {t.untyped_storage().data_ptr(): t for t in live}
    big = sorted(seen.values(), key=lambda t: -t.untyped_storage().nbytes())[:n]
    return [{"bytes": t.untyped_storage().nbytes(), "shape": list(t.shape), "dtype": str(t.dtype)} for t in big]


def resident(eng, device: str) -> dict:
    """What stays on the device: the engine's storage bytes; CUDA: free/used (mem_get_info), the allocator."""
    return {"engine_bytes": engine_storage_bytes(eng, device), **memory(device)}


def call_text(e: dict) -> str:
    """A logged call as it was written: ``policy.offload(params=False, grads='drop', optimizer=True)``."""
    args = [*map(repr, e["args"]), *(f"{k}={v!r}" for k, v in e["kwargs"].items())]
    return f"{e['component']}.{e['method']}({', '.join(args)})"


class Stand:
    """A component for ``Colocation``: every call made on it goes into ``log`` (method, arguments,
    wall seconds, result); with a ``target`` (the policy's engine) the call goes through to it."""

    def __init__(self, name: str, log: list, target=None):
        self._name, self._log, self._target = name, log, target

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = None if self._target is None else getattr(self._target, method)(*args, **kwargs)
            self._log.append({"component": self._name, "method": method, "args": list(args), "kwargs": kwargs,
                              "wall_s": time.perf_counter() - t0, "result": out})
            return out
        return call


def controller_cycle(eng, step, device: str, c: Checks) -> dict:
    """The policy's moves around a generation, as the controller makes them (module doc, 1)."""
    from megatron_tppo.controller.colocation import Colocation
    from megatron_tppo.training.offload import ALIGN, engine_tensors

    cuda = device == "cuda"
    kinds = storage_kinds(eng, device)
    P, G, O = (kinds[k]["bytes"] for k in ("params", "grads", "optimizer"))
    snap = host_copy(eng, grads=False)  # (the gradients are dropped: they come back zero)
    log: list[dict] = []
    col = Colocation(SimpleNamespace(rollout=SimpleNamespace(colocate=True), parallel=SimpleNamespace(trainers="split")),
                     Stand("rollout", log))
    col.attach(Stand("policy", log, eng), Stand("critic", log))
    col.enter(CYCLE[0])  # the phase it starts in (no move: the first phase entered)
    settle(device)
    before, moves = resident(eng, device), {}
    for prev, name in zip(CYCLE, CYCLE[1:]):
        del log[:]
        _, s = timed(col.enter, name)
        m = moves[name] = {"from": prev, "enter_s": s, "calls": [call_text(e) for e in log],
                           "offloaded": sorted(eng.offloaded), "dropped": sorted(eng.dropped),
                           "resident": resident(eng, device)}
        policy = [e for e in log if e["component"] == "policy"]
        if len(policy) == 1:  # its time: the offloader's, the call's (with empty_cache), GB/s copied
            m["policy_call"], r = policy[0], policy[0]["result"]
            m.update(seconds=r["seconds"], wall_s=policy[0]["wall_s"],
                     gb_per_s=r["bytes"] / max(r["seconds"], 1e-9) / 1e9)
        if cuda and name == "generation":
            m["largest_resident_tensors"] = top_cuda_tensors()
    res = {"phases": list(CYCLE), "kinds": kinds, "resident_before": before, "moves": moves}
    if not c("one policy call per move", all("policy_call" in m for m in moves.values()),
             {n: m["calls"] for n, m in moves.items()}):
        return res
    sync, gen, back = (moves[n]["policy_call"]["result"] for n in CYCLE[1:])
    c("sync: gradients and optimizer state off (gradients dropped), parameters kept",
      (moves["sync"]["offloaded"], moves["sync"]["dropped"]) == (["grads", "optimizer"], ["grads"]), moves["sync"])
    c("sync: the gradients' bytes dropped, the optimizer's copied", sync["dropped_bytes"] == sync["grads_bytes"] == G
      and sync["bytes"] == sync["optimizer_bytes"] == O and sync["params_bytes"] == 0, (sync, kinds))
    c("generation: the parameters copied", gen["bytes"] == gen["params_bytes"] == P and gen["dropped_bytes"] == 0
      and gen["grads_bytes"] == gen["optimizer_bytes"] == 0, (gen, kinds))
    c("generation: none of the engine's storages on the device", moves["generation"]["resident"]["engine_bytes"] == 0,
      moves["generation"]["resident"])
    c("values: onload brings back every byte (gradients zero-filled)", not moves["values"]["offloaded"]
      and back["bytes"] == P + O and back["zeroed_bytes"] == G
      and moves["values"]["resident"]["engine_bytes"] == before["engine_bytes"] == P + G + O, (back, kinds))

    copied = kinds["params"]["storages"] + kinds["optimizer"]["storages"]
    host = {**host_memory(eng, gen), "storages": sync["storages"] + gen["storages"], "copied_storages": copied,
            "layout_bytes": kinds["params"]["layout_bytes"] + kinds["optimizer"]["layout_bytes"],
            "slack_bytes": gen["host_bytes"] - gen["storage_bytes"], "align": ALIGN}
    host["pinned_equals_host"] = host["pinned_bytes"] == gen["host_bytes"]
    res["host"] = host
    c("host buffer holds the parameters and optimizer state", gen["storage_bytes"] == P + O, host)
    c(f"host_bytes - storage_bytes < {ALIGN} * storages", 0 <= host["slack_bytes"] < ALIGN * copied, host)
    c("host buffer = the cycle's layout, exactly",
      gen["host_bytes"] == host["layout_bytes"] == host["host_buffer_bytes"], host)
    if cuda:
        c("pinned_bytes == host_bytes", host["pinned_equals_host"] and host["offloader_pinned"], host)
        a = before["allocated_bytes"]
        res["allocated_freed"] = {n: (a - moves[n]["resident"]["allocated_bytes"]) / max(a, 1) for n in CYCLE[1:3]}
        freed_sync = a - moves["sync"]["resident"]["allocated_bytes"]
        c("sync frees >= 90% of the gradients and optimizer state", freed_sync >= 0.9 * (G + O), freed_sync)
        c("generation: allocated freed >= 90%", res["allocated_freed"]["generation"] >= 0.9, res["allocated_freed"])
    else:
        c("no pinning on CPU", host["pinned_bytes"] == 0 and not host["offloader_pinned"], host)

    res["restore_mismatches"] = bad = mismatches(snap, dict(engine_items(eng, grads=False)))
    c("parameters, master shards, optimizer state bit-identical after onload", not bad, bad[:5])
    nonzero = sum(1 for t in engine_tensors(eng)["grads"] if t.numel() and bool(t.any()))
    res["grads_zero_after_onload"] = nonzero == 0
    c("gradients zero after onload", nonzero == 0, f"{nonzero} gradient tensors not zero")

    # the next step against an engine built alike that never offloaded
    ((ref, ref_step), ref_build_s), ref_losses = timed(build_engine, device, True), []
    ref_losses.append(ref_step())
    control = mismatches(snap, dict(engine_items(ref, grads=False)))
    del snap
    loss, ref_losses = step(), [*ref_losses, ref_step()]
    a, b = dict(engine_items(eng)), dict(engine_items(ref))
    after = mismatches(b, a)
    res["reference"] = ref_res = {
        "build_s": ref_build_s, "losses": ref_losses, "loss_after_cycle": loss, "control_mismatches": control[:10],
        "reproduces_first_step": not control, "step_mismatches": after[:10],
        "step_bit_identical": not after and loss == ref_losses[1], "param_max_abs_diff": max_abs_diff(b, a)}
    del a, b, ref, ref_step
    settle(device)
    if ref_res["reproduces_first_step"]:
        c("step after the cycle = the reference's, bit for bit (loss, parameters, gradients, optimizer state)",
          ref_res["step_bit_identical"], ref_res)
    else:  # not judged: a fresh engine does not even reproduce the first step here
        ref_res["not_judged"] = "the reference did not reproduce the first step bit for bit (device nondeterminism)"
    c("step after the cycle finite", abs(loss) < float("inf"), loss)
    return res


def part_offload(device: str, work: Path) -> dict:
    import torch

    cuda, c, mem, held = device == "cuda", Checks(), {}, {}
    if cuda:  # before cuBLAS starts; the step comparison can then be exact
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if hasattr(torch.utils, "deterministic"):  # (else every new allocation is NaN-filled: timed moves)
            torch.utils.deterministic.fill_uninitialized_memory = False
    (eng, step), build_s = timed(build_engine, device, True)
    losses = [step()]
    cycle = controller_cycle(eng, step, device, c)
    losses.append(cycle.get("reference", {}).get("loss_after_cycle"))

    def probe(name: str) -> None:
        mem[name], held[name] = memory(device), engine_storage_bytes(eng, device)

    # the default call: gradients copied
    probe("stepped")
    snap = host_copy(eng, grads=True)
    off = eng.offload()
    probe("offloaded")
    resident_tensors, host = top_cuda_tensors() if cuda else None, host_memory(eng, off)
    on = eng.onload()
    probe("onloaded")
    bad = mismatches(snap, dict(engine_items(eng)))
    del snap
    losses.append(step())
    off2, mem["offloaded_again"], on2 = eng.offload(), memory(device), eng.onload()  # host buffer exists now
    kinds = sum(off[f"{k}_bytes"] for k in ("params", "grads", "optimizer"))
    c("offload empties every engine storage", held["offloaded"] == 0, held)
    c("offload bytes = sum of kinds", off["bytes"] + off.get("dropped_bytes", 0) == kinds, off)
    c("everything offloaded was live", kinds == held["stepped"], f"{kinds} vs {held['stepped']}")
    c("onload brings back what went", on["bytes"] == off["bytes"] and held["onloaded"] == held["stepped"], on)
    c("restore bit-identical", not bad, bad[:5])
    c("step after onload finite", abs(losses[-1]) < float("inf"), losses)
    c("host buffer holds the offload", host.get("host_bytes", off["bytes"]) >= off["bytes"], host)
    c("pinned bytes" + (" cover the offload" if cuda else ": none on CPU"),
      host["pinned_bytes"] >= off["bytes"] if cuda else host["pinned_bytes"] == 0, host)
    if cuda:  # in bytes: a reference engine the cycle failed to free would skew a fraction
        freed = mem["stepped"]["allocated_bytes"] - mem["offloaded"]["allocated_bytes"]
        c("allocated freed >= 90% of the engine's bytes", freed >= 0.9 * held["stepped"],
          f"{freed} of {held['stepped']}")
    moves = dict(offload=off, onload=on, offload_again=off2, onload_again=on2)
    return c.result(parameters=sum(p.numel() for p in eng.module.parameters()), params_dtype="bf16", build_s=build_s,
                    deterministic_algorithms=cuda, controller_cycle=cycle, memory=mem, engine_storage_bytes=held,
                    host=host, resident_after_offload=resident_tensors, step_losses=losses, **moves,
                    **{f"{k}_gb_per_s": v["bytes"] / max(v["seconds"], 1e-9) / 1e9 for k, v in moves.items()})

"""The offloader's one host buffer, single process, on plain tensors (the megatron-core engine
runs the same code in test_colocate.py): its size, its reuse across cycles and kinds, dropping."""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.training.offload import ALIGN, StorageOffloader


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def make_tensors(adam_numel: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    param = torch.randn(37, generator=g)  # 148 bytes: not a multiple of ALIGN
    state = [torch.randn(adam_numel, generator=g), torch.tensor(3.0)] if adam_numel else []
    return {"params": [param, param[5:9]],  # a view: one storage
            "grads": [torch.randn(37, generator=g)],
            "optimizer": [torch.randn(10, dtype=torch.float64, generator=g), *state]}


def storages(tensors: dict) -> dict[str, list[int]]:
    return {k: sorted({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())
            for k, ts in tensors.items()}


def clones(tensors: dict) -> dict:
    return {k: [t.clone() for t in ts] for k, ts in tensors.items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_one_exact_buffer_reused_by_every_cycle_and_kind():
    ts, off = make_tensors(adam_numel=20), StorageOffloader("cpu")
    before, sizes = clones(ts), storages(ts)
    allsizes = [n for k in sizes for n in sizes[k]]
    st = off.offload(ts, ["params", "grads", "optimizer"])
    assert st["host_bytes"] == off.host_bytes == sum(_round(n) for n in allsizes) < 2 * sum(allsizes)
    assert st["storage_bytes"] == st["bytes"] == sum(allsizes) and st["dropped_bytes"] == 0
    assert all(t.untyped_storage().nbytes() == 0 for k in ts for t in ts[k])
    assert len(off.host_buffers) == 1 and off.host_buffers[0].data_ptr() % ALIGN == 0 and not off.pinned
    ptr = off.host_buffers[0].data_ptr()
    assert off.onload()["bytes"] == sum(allsizes) and same(ts, before)
    # another cycle, kind by kind: the slices laid out at its first offload, in the same buffer
    a = off.offload(ts, ["optimizer"])
    b = off.offload(ts, ["params"])
    assert (a["bytes"], b["bytes"]) == (sum(sizes["optimizer"]), sum(sizes["params"]))
    assert b["storage_bytes"] == a["bytes"] + b["bytes"] and off.offloaded_kinds == {"params", "optimizer"}
    assert off.host_buffers[0].data_ptr() == ptr and off.host_bytes == st["host_bytes"]
    off.onload()
    assert same(ts, before)


def test_dropped_storages_take_no_host_bytes_and_come_back_zero():
    ts, off = make_tensors(adam_numel=20), StorageOffloader("cpu")
    before, sizes = clones(ts), storages(ts)
    st = off.offload(ts, ["params", "optimizer"], drop=["grads"])
    kept = sizes["params"] + sizes["optimizer"]
    assert st["host_bytes"] == sum(_round(n) for n in kept) and st["storage_bytes"] == st["bytes"] == sum(kept)
    assert st["dropped_bytes"] == st["grads_bytes"] == sum(sizes["grads"]) > 0
    assert off.dropped_kinds == {"grads"} and ts["grads"][0].untyped_storage().nbytes() == 0
    on = off.onload()
    assert on["zeroed_bytes"] == sum(sizes["grads"]) and on["bytes"] == sum(kept)
    assert not ts["grads"][0].any() and before["grads"][0].any()
    before["grads"] = ts["grads"]
    assert same(ts, before)
    with pytest.raises(ValueError):
        off.offload(ts, ["grads"], drop=["grads"])


def test_buffer_grows_exactly_when_new_state_appears_between_cycles():
    ts, off = make_tensors(), StorageOffloader("cpu")  # before the first step: no Adam state
    small = off.offload(ts, ["params", "optimizer"], drop=["grads"])["host_bytes"]
    off.onload()
    ts["optimizer"] += [torch.ones(300), torch.tensor(1.0)]  # Adam's moments and step appear
    sizes = storages(ts)
    st = off.offload(ts, ["params", "optimizer"], drop=["grads"])
    assert st["host_bytes"] == sum(_round(n) for n in sizes["params"] + sizes["optimizer"]) > small
    assert len(off.host_buffers) == 1
    off.onload()
    assert torch.equal(ts["optimizer"][1], torch.ones(300))


def test_a_storage_appearing_in_the_middle_of_a_cycle_is_refused():
    ts, off = make_tensors(), StorageOffloader("cpu")
    off.offload(ts, ["optimizer"], drop=["grads"])
    ts["params"].append(torch.zeros(8))  # not laid out at the cycle's first offload
    with pytest.raises(RuntimeError, match="appeared while offloaded"):
        off.offload(ts, ["params"])
    off.onload()
    off.offload(ts, ["params"])  # a new cycle lays it out
    with pytest.raises(RuntimeError, match="offloaded into the host buffer"):
        off.release_host()  # never while it holds bytes
    off.onload()
    off.release_host()
    assert off.host_bytes == 0 and off.host_buffers == []

"""The wire format of megatron_tppo.weights.transfer on a real 2-rank gloo group (two threads):
planned buckets from meta shapes equal the real bucketing, a round trip is bit-exact, a stream
that leaves the plan is refused, and a receiver that stalls is named in bounded time. The ipc transport
runs between real processes (this one sending, two receivers of their own): bit-exact, through
shared memory, with only handles on the wire."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.weights import hf_mapping as hm
from megatron_tppo.weights.buckets import hf_buckets
from megatron_tppo.weights.hf_config import random_hf_model
from megatron_tppo.weights.bucket_plan import plan_stage
from megatron_tppo.weights.transfer import receive, send_buckets, send_planned
from megatron_tppo.weights.transports import TransferStalled, TransferStats, join, open_store
from tests.conftest import REPO

M = ModelConfig(arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=2,
                num_query_groups=1, vocab_size=100, max_position_embeddings=32, qkv_bias=True,
                tie_word_embeddings=False)


@pytest.fixture(scope="module")
def megatron_sd():
    return hm.hf_state_dict_to_megatron(random_hf_model(M, seed=3).state_dict(), M)


def pair(send):
    """Run ``send(group0)`` in a thread while this thread receives; returns (received list, send result)."""
    store = open_store("127.0.0.1", timeout_s=60)
    out = {}

    def sender():
        g = join("gloo", 0, 2, store=store, timeout_s=60)
        try:
            out["result"] = send(g)
        except Exception as e:  # noqa: BLE001 - re-raised below
            out["error"] = e
            g.end()  # let the receiver finish
        g.close()

    t = threading.Thread(target=sender)
    t.start()
    g = join("gloo", 1, 2, address=("127.0.0.1", store.port), timeout_s=60)
    stats = TransferStats()
    got = [(n, x.clone()) for n, x in receive(g, stats)]
    t.join()
    g.close()
    return got, out, stats


def test_plan_equals_real_buckets_and_round_trip_is_exact(megatron_sd):
    bound = 20_000
    specs = [(n, t.shape, t.dtype) for n, t in megatron_sd.items()]
    plan = plan_stage(specs, M, bound)
    real = list(hf_buckets(iter(megatron_sd.items()), M, bound))
    assert [[s.name for s in b] for b in plan.buckets] == [[n for n, _ in b] for b in real]
    assert all(s.offset % 64 == 0 for b in plan.buckets for s in b)
    got, out, stats = pair(lambda g: send_planned(g, iter(megatron_sd.items()), plan, M))
    want = hm.megatron_state_dict_to_hf(megatron_sd, M)
    assert [n for n, _ in got] == list(want) and all(torch.equal(t, want[n]) for n, t in got)
    assert out["result"].buckets == stats.buckets == len(plan.buckets) and stats.bytes == plan.nbytes
    assert out["result"].wire_bytes >= plan.nbytes and stats.wire_bytes == out["result"].wire_bytes  # bytes on the wire
    assert stats.peak_live_bytes <= 2 * max(plan.sizes)  # the clones above let every bucket go at once


def test_stream_off_the_plan_is_refused(megatron_sd):
    plan = plan_stage([(n, t.shape, t.dtype) for n, t in megatron_sd.items()], M, 20_000)
    reordered = list(megatron_sd.items())[::-1]
    _, out, _ = pair(lambda g: send_planned(g, iter(reordered), plan, M))
    assert "does not follow the stage's plan" in str(out["error"])


def test_send_buckets_mixed_dtypes():
    bucket = [("a", torch.arange(5, dtype=torch.float32)), ("b", torch.ones(3, 2, dtype=torch.bfloat16))]
    got, _, _ = pair(lambda g: send_buckets(g, [bucket, bucket[:1]]))
    assert [n for n, _ in got] == ["a", "b", "a"]
    assert torch.equal(got[1][1], bucket[1][1]) and got[1][1].dtype == torch.bfloat16


def test_a_stalled_receiver_is_named_within_the_timeout(megatron_sd):
    """Two real receivers (threads in gloo groups); one joins and then never takes a bucket. The
    sender's bucket must fail within the group's timeout, naming that receiver and the bucket."""
    import time

    plan = plan_stage([(n, t.shape, t.dtype) for n, t in megatron_sd.items()], M, 20_000)
    store = open_store("127.0.0.1", timeout_s=30)
    timeout = 4.0
    names = {1: "engine 0 worker 0", 2: "engine 1 worker 0"}
    joined, done = {}, threading.Event()

    def receiver(rank: int, stall: bool):
        g = join("ipc", rank, 3, address=("127.0.0.1", store.port), timeout_s=timeout)
        joined[rank] = g
        if stall:
            done.wait(60)  # a receiver that stopped: joined, never takes a bucket
        else:
            try:
                list(receive(g))
            except RuntimeError:
                pass  # its peer's failure ends the group for it too
        g.close()

    threads = [threading.Thread(target=receiver, args=(r, r == 2)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender = join("ipc", 0, 3, store=store, timeout_s=timeout, names=names, stage="stage 0")
    t0 = time.perf_counter()
    with pytest.raises(TransferStalled) as err:
        send_planned(sender, iter(megatron_sd.items()), plan, M)
    waited = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join(timeout=30)
    sender.close()
    msg = str(err.value)
    assert waited < 3 * timeout, waited
    assert "engine 1 worker 0 (has not started)" in msg and "engine 0 worker 0" not in msg, msg
    assert "bucket 0 did not get through within 4 s" in msg and "stage 0" in msg, msg


def test_ipc_between_processes_is_exact_in_shared_memory_with_handles_on_the_wire(megatron_sd, tmp_path):
    bound = 20_000
    plan = plan_stage([(n, t.shape, t.dtype) for n, t in megatron_sd.items()], M, bound)
    assert len(plan.buckets) >= 4
    store = open_store("127.0.0.1", timeout_s=60)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    outs = [tmp_path / f"rank{r}.pt" for r in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.weights._ipc_receiver", "127.0.0.1", str(store.port),
                               str(r), "3", str(out)], cwd=REPO, env=env) for r, out in zip((1, 2), outs)]
    try:
        group = join("ipc", 0, 3, store=store, timeout_s=60)
        sent = send_planned(group, iter(megatron_sd.items()), plan, M)
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        group.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    want = hm.megatron_state_dict_to_hf(megatron_sd, M)
    for out in outs:
        got = torch.load(out)
        assert [n for n, _ in got["tensors"]] == list(want)
        assert all(t.dtype == want[n].dtype and torch.equal(t, want[n]) for n, t in got["tensors"])
        assert all(got["shared"])  # every view lies in shared memory: the sender's pages, mapped
        assert got["stats"]["buckets"] == len(plan.buckets) and got["stats"]["bytes"] == plan.nbytes
        # the views outlived the sender's release of each bucket (it keeps one at a time)
        assert got["stats"]["peak_live_bytes"] == sum(plan.sizes)
    assert sent.peak_live_bytes == max(plan.sizes)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"tppo_weights_{os.getpid()}_")]  # all unlinked
    # only handles and acks crossed the group: per bucket a few hundred bytes per receiver
    assert sent.wire_bytes < len(plan.buckets) * 2 * 2048 < plan.nbytes / 4, (sent.wire_bytes, plan.nbytes)

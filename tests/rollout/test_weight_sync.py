"""Bucketed streaming of megatron weights: bounds, module integrity, laziness, and a real vLLM sync."""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.weights import hf_mapping as hm
from megatron_tppo.weights.buckets import SyncStats, hf_buckets, sync_weights
from megatron_tppo.weights.hf_config import random_hf_model


@pytest.fixture(scope="module")
def qwen2_megatron_sd(tiny_qwen2_cfg):
    return hm.hf_state_dict_to_megatron(random_hf_model(tiny_qwen2_cfg, seed=6).state_dict(), tiny_qwen2_cfg)


@pytest.mark.parametrize("bound_kb", [1, 64, 200, 10_000])
def test_buckets_bounded_whole_modules_and_complete(tiny_qwen2_cfg, qwen2_megatron_sd, bound_kb):
    m, bound = tiny_qwen2_cfg, bound_kb * 1024
    stats = SyncStats()
    buckets = list(hf_buckets(qwen2_megatron_sd.items(), m, bound, stats))
    flat = dict(pair for b in buckets for pair in b)
    expected = hm.megatron_state_dict_to_hf(qwen2_megatron_sd, m)
    assert flat.keys() == expected.keys() and all(torch.equal(flat[k], expected[k]) for k in flat)
    assert stats.buckets == len(buckets) and stats.tensors == len(flat)
    assert stats.bytes == sum(t.numel() * 4 for t in expected.values()) == sum(stats.bucket_bytes)
    # a bucket is over the bound only if it holds a single module
    for b, size in zip(buckets, stats.bucket_bytes):
        if size > bound:
            modules = {n.rsplit(".", 1)[0].replace("q_proj", "").replace("k_proj", "").replace("v_proj", "")
                       .replace("gate_proj", "").replace("up_proj", "") for n, _ in b}
            assert len(modules) == 1, [n for n, _ in b]
    # q/k/v (weight and bias) of a layer, and gate/up, always travel together
    home = {n: i for i, b in enumerate(buckets) for n, _ in b}
    for layer in range(m.num_layers):
        p = f"model.layers.{layer}."
        assert len({home[p + f"self_attn.{x}_proj.{k}"] for x in "qkv" for k in ("weight", "bias")}) == 1
        assert home[p + "mlp.gate_proj.weight"] == home[p + "mlp.up_proj.weight"]


def test_buckets_consume_the_source_lazily(tiny_qwen2_cfg, qwen2_megatron_sd):
    pulled = []

    def source():
        for name, t in qwen2_megatron_sd.items():
            pulled.append(name)
            yield name, t

    it = hf_buckets(source(), tiny_qwen2_cfg, bucket_bytes=64 * 1024)
    next(it)
    assert len(pulled) < len(qwen2_megatron_sd) // 2  # the gather is driven by the consumer


def test_sync_weights_into_vllm(engine, hf_qwen2, tiny_qwen2_cfg, qwen2_megatron_sd, hf_logprobs):
    m = tiny_qwen2_cfg
    new_hf = random_hf_model(m, seed=6)  # the model qwen2_megatron_sd was made from
    seq = [11, 22, 33, 44, 55, 66]
    try:
        stats = sync_weights(engine, iter(qwen2_megatron_sd.items()), m, version=9, bucket_bytes=64 * 1024)
        assert stats.buckets > 3 and stats.seconds > 0
        (lp,) = engine.prompt_logprobs([seq])
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), hf_logprobs(new_hf, seq, 1), atol=1e-4)
        assert engine.generate([seq], max_tokens=1)[0].policy_version == 9
    finally:
        engine.load_weights(hf_qwen2.state_dict().items(), version=0)

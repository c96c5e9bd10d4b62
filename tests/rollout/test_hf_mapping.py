"""HF <-> megatron weight maps: exact round trips (pure) and logits parity with real models.

Parity: a random HF Qwen2 (GQA, QKV bias, tied) and Llama (GQA, no bias, untied) are loaded into a
megatron-core GPTModel (local spec, world size 1 on gloo) through the map; the logits must equal
HF's in fp32. Vocabulary 300 is padded to 384 rows in megatron, so the padding path runs too.
"""
from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_tppo.weights import hf_mapping as hm
from megatron_tppo.weights.hf_config import random_hf_model


@pytest.fixture(params=["qwen2", "llama"])
def cfg(request, tiny_qwen2_cfg, tiny_llama_cfg):
    return tiny_qwen2_cfg if request.param == "qwen2" else tiny_llama_cfg


def _reference_split_qkv(fused, m):
    """Plain loop over groups/heads: the oracle for the reshape-based split."""
    g, q, d = m.num_query_groups, m.num_attention_heads // m.num_query_groups, m.head_size
    qs, ks, vs, row = [], [], [], 0
    for _ in range(g):
        for _ in range(q):
            qs.append(fused[row:row + d]); row += d
        ks.append(fused[row:row + d]); row += d
        vs.append(fused[row:row + d]); row += d
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


@pytest.mark.parametrize("groups,heads", [(1, 4), (2, 4), (4, 4), (2, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_split_qkv_matches_reference_loop_and_merge_inverts(tiny_qwen2_cfg, groups, heads, bias):
    m = dataclasses.replace(tiny_qwen2_cfg, num_attention_heads=heads, num_query_groups=groups, hidden_size=heads * 32)
    rows = groups * (heads // groups + 2) * 32
    fused = torch.randn(rows) if bias else torch.randn(rows, 16)
    got, ref = hm.split_qkv(fused, m), _reference_split_qkv(fused, m)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(hm.merge_qkv(*got, m), fused)


def test_hf_megatron_hf_round_trip_is_exact(cfg):
    hf = random_hf_model(cfg, seed=3).state_dict()
    meg = hm.hf_state_dict_to_megatron(hf, cfg)
    assert list(meg) == hm.megatron_param_names(cfg)
    assert meg["embedding.word_embeddings.weight"].shape == (cfg.padded_vocab_size, cfg.hidden_size)
    assert torch.count_nonzero(meg["embedding.word_embeddings.weight"][cfg.vocab_size:]) == 0
    assert ("output_layer.weight" in meg) == (not cfg.tie_word_embeddings)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in meg) == cfg.qkv_bias
    back = hm.megatron_state_dict_to_hf(meg, cfg)
    expected = {k for k in hf if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    assert all(torch.equal(back[k], hf[k]) for k in back)


def test_transformer_engine_names_share_the_map(cfg):
    hf = random_hf_model(cfg, seed=4).state_dict()
    local, te = hm.hf_state_dict_to_megatron(hf, cfg), hm.hf_state_dict_to_megatron(hf, cfg, te=True)
    assert torch.equal(te["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"],
                       local["decoder.layers.1.input_layernorm.weight"])
    assert torch.equal(te["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"],
                       local["decoder.layers.1.pre_mlp_layernorm.weight"])
    assert hm.megatron_state_dict_to_hf(te, cfg).keys() == hm.megatron_state_dict_to_hf(local, cfg).keys()


def test_map_edges(tiny_qwen2_cfg):
    m = tiny_qwen2_cfg
    assert hm.megatron_to_hf("decoder.layers.0.mlp.linear_fc1._extra_state", torch.empty(0), m) == []
    assert hm.megatron_to_hf("output_layer.weight", torch.zeros(384, 128), m) == []  # tied copy
    with pytest.raises(KeyError, match="unknown megatron parameter"):
        hm.megatron_to_hf("decoder.layers.0.mlp.router.weight", torch.zeros(1), m)
    with pytest.raises(KeyError, match="no megatron counterpart"):
        hm.hf_state_dict_to_megatron(dict(random_hf_model(m).state_dict(), extra=torch.zeros(1)), m)
    with pytest.raises(ValueError, match="no HF weight map"):
        hm.megatron_to_hf("decoder.final_layernorm.weight", torch.zeros(1), dataclasses.replace(m, arch="gpt2"))


# ---------------------------------------------------------------------------------------------
# Logits parity with a real megatron-core GPTModel
# ---------------------------------------------------------------------------------------------


class _CudaToCpu(TorchFunctionMode):
    """Scoped to the megatron calls of this test: megatron-core names device="cuda" in a few
    factories and ``.to(device=torch.cuda.current_device())`` (RoPE); the project shim (megatron_tppo.platform.cpu) would instead
    stay entered for the whole process, which this session shares with vLLM."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if isinstance(dev, int) or (isinstance(dev, str) and dev.startswith("cuda")) or \
                (isinstance(dev, torch.device) and dev.type == "cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _init_megatron_world_size_one():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # dropout is 0


def _megatron_gpt(m):
    """GPTModel (local spec) with the project's architecture choices for ``m``, fp32 on CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, kv_channels=m.head_size,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, attention_softmax_in_fp32=True)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=m.padded_vocab_size, max_sequence_length=m.max_position_embeddings,
                    share_embeddings_and_output_weights=m.tie_word_embeddings, position_embedding_type="rope",
                    rotary_base=int(m.rope_theta)).eval()


@pytest.mark.distributed
def test_megatron_logits_equal_hf_through_the_map(cfg, monkeypatch):
    _init_megatron_world_size_one()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # RoPE asks for it; 0 -> cpu below
    hf_model = random_hf_model(cfg, seed=5)
    with _CudaToCpu():
        model = _megatron_gpt(cfg)
        state = hm.hf_state_dict_to_megatron(hf_model.state_dict(), cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 299, 0]])
        t = tokens.shape[1]
        causal = torch.triu(torch.ones(1, 1, t, t, dtype=torch.bool), diagonal=1)  # True = masked
        with torch.no_grad():
            meg_logits = model(tokens, torch.arange(t)[None], causal)
            ref = hf_model(tokens).logits
        # and back: the megatron model's own state dict maps to HF's tensors exactly
        back = hm.megatron_state_dict_to_hf({k: v for k, v in model.state_dict().items()
                                             if not k.endswith("_extra_state")}, cfg)
    assert meg_logits.shape == (1, t, cfg.padded_vocab_size)
    err = (meg_logits[..., :cfg.vocab_size] - ref).abs().max().item()
    print(f"{cfg.arch}: max |logit diff| megatron vs HF = {err:.2e}")
    assert err < 1e-5, err
    hf_sd = hf_model.state_dict()
    assert all(torch.equal(v, hf_sd[k]) for k, v in back.items())


def test_model_config_round_trips_through_the_hf_config(cfg):
    from megatron_tppo.weights.hf_config import model_config_from_hf

    hf = random_hf_model(cfg).config.to_dict()
    assert model_config_from_hf(hf) == cfg

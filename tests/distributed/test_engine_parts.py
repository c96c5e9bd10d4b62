"""Single-process checks of the engine's parts: vocab-parallel math, micro-batching, FP8 refusal."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.models import FP8UnavailableError, check_fp8_support, transformer_config
from megatron_tppo.training.batching import (
    padding_fraction,
    plan_micro_batches,
    row_lengths,
    split_for_data_parallel,
)
from megatron_tppo.training.vocab_parallel import reference_logprobs_entropy, vocab_parallel_logprobs


@pytest.mark.parametrize("with_entropy", [False, True])
def test_vocab_parallel_matches_reference_with_grads(with_entropy):
    torch.manual_seed(0)
    vocab, padded = 13, 16  # the 3 padded ids must not take part in the softmax
    logits = torch.randn(3, 5, padded, dtype=torch.float32, requires_grad=True)
    target = torch.randint(0, vocab, (3, 5))
    w1, w2 = torch.randn(3, 5), torch.randn(3, 5)

    logp, ent = vocab_parallel_logprobs(logits, target, vocab, None, with_entropy)
    loss = (logp * w1).sum() + ((ent * w2).sum() if with_entropy else 0)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logp, ref_ent = reference_logprobs_entropy(logits, target, vocab)
    ref_loss = (ref_logp * w1).sum() + ((ref_ent * w2).sum() if with_entropy else 0)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)

    assert (logp - ref_logp).abs().max() < 1e-5
    if with_entropy:
        assert (ent - ref_ent).abs().max() < 1e-5
    else:
        assert ent is None
    assert (grad - ref_grad).abs().max() < 1e-5
    assert grad[..., vocab:].abs().max() == 0


def test_micro_batches_respect_budget_and_cover_rows():
    lengths = torch.tensor([5, 120, 33, 64, 7, 90, 12, 64])
    plan = plan_micro_batches(lengths, micro_batch_tokens=130)
    rows = torch.cat(plan.rows).sort().values
    assert rows.tolist() == list(range(len(lengths)))
    for r, w in zip(plan.rows, plan.widths):
        assert w == int(lengths[r].max())
        assert len(r) == 1 or len(r) * w <= 130
    naive = plan_micro_batches(lengths, micro_batch_tokens=130, sort=False)
    assert padding_fraction(lengths, plan) < padding_fraction(lengths, naive)


def test_data_parallel_split_balances_tokens():
    attn = torch.zeros(5, 10)
    for i, n in enumerate([10, 9, 2, 2, 1]):
        attn[i, :n] = 1
    batch = {"tokens": torch.arange(50).view(5, 10), "attention_mask": attn, "adv": torch.arange(5.0)}
    shards = [split_for_data_parallel(batch, 2, r) for r in range(2)]
    assert sorted(torch.cat([s["adv"] for s in shards]).tolist()) == [0, 1, 2, 3, 4]
    loads = [int(row_lengths(s).sum()) for s in shards]
    assert abs(loads[0] - loads[1]) <= 2
    with pytest.raises(ValueError):
        split_for_data_parallel(batch, 6, 0)


def test_fp8_without_gpu_raises_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(FP8UnavailableError, match="needs a CUDA GPU with Transformer Engine"):
        check_fp8_support("e4m3", "cpu")
    with pytest.raises(FP8UnavailableError, match="model.fp8=null"):
        check_fp8_support("hybrid", "auto")
    check_fp8_support(None, "cpu")  # FP8 off: nothing to check
    # the model builder refuses before building anything
    with pytest.raises(FP8UnavailableError):
        transformer_config(ModelConfig(fp8="e4m3", params_dtype="bf16"), 1, 1, "cpu")


def test_training_package_imports_no_megatron_vllm_or_ray():
    code = ("import sys, megatron_tppo.training, megatron_tppo.models, megatron_tppo.platform; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'ray') or m.startswith('megatron.core')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

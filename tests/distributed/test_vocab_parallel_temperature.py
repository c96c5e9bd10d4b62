"""The trainer's tempered log-probs and entropy against plain torch: log_softmax(logits / T) over the
real vocabulary, with gradients, in one process and split over a TP=2 gloo group (real processes)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_tppo.training.vocab_parallel import vocab_parallel_logprobs

VOCAB, PADDED = 13, 16  # the 3 padded ids must not take part in the softmax


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, PADDED, generator=g) * 3.0
    target = torch.randint(0, VOCAB, (3, 5), generator=g)
    w1, w2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    return logits, target, w1, w2


def _plain(logits, target, temperature, w1, w2):
    """log_softmax(logits / T): log-probs of target, entropy, and d(w1.logp + w2.H)/d logits."""
    x = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(x[..., :VOCAB] / temperature, dim=-1)
    logp = logsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    (grad,) = torch.autograd.grad((logp * w1).sum() + (ent * w2).sum(), x)
    return logp.detach(), ent.detach(), grad


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_tempered_logprobs_entropy_and_grads_match_plain_torch(temperature):
    logits, target, w1, w2 = _inputs()
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, target, VOCAB, None, with_entropy=True, temperature=temperature)
    (grad,) = torch.autograd.grad((logp * w1).sum() + (ent * w2).sum(), x)
    ref_logp, ref_ent, ref_grad = _plain(logits, target, temperature, w1, w2)
    assert (logp - ref_logp).abs().max() < 1e-5
    assert (ent - ref_ent).abs().max() < 1e-5
    assert (grad - ref_grad).abs().max() < 1e-5
    assert grad[..., VOCAB:].abs().max() == 0
    # without entropy: the same log-probs, and the log-prob gradient alone
    x2 = logits.clone().requires_grad_(True)
    logp2, none = vocab_parallel_logprobs(x2, target, VOCAB, None, temperature=temperature)
    (g2,) = torch.autograd.grad((logp2 * w1).sum(), x2)
    _, _, ref_g2 = _plain(logits, target, temperature, w1, torch.zeros_like(w2))
    assert none is None and (logp2 - ref_logp).abs().max() < 1e-5 and (g2 - ref_g2).abs().max() < 1e-5


def test_temperature_changes_the_numbers():
    """The oracle can tell: raw logits (T = 1) are far from the T = 0.7 log-probs on these inputs."""
    logits, target, w1, w2 = _inputs()
    raw, _ = vocab_parallel_logprobs(logits, target, VOCAB, None)
    tempered, _, _ = _plain(logits, target, 0.7, w1, w2)
    assert (raw - tempered).abs().max() > 0.1
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, target, VOCAB, None, temperature=0.0)


def _tp_rank(rank: int, port: int, temperature: float, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logits, target, w1, w2 = _inputs()
        shard = logits[..., rank * PADDED // 2:(rank + 1) * PADDED // 2].clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs(shard, target, VOCAB, dist.group.WORLD, with_entropy=True,
                                            temperature=temperature)
        (grad,) = torch.autograd.grad((logp * w1).sum() + (ent * w2).sum(), shard)
        out[rank] = (logp.detach(), ent.detach(), grad)
    finally:
        dist.destroy_process_group()


def test_tp2_shards_match_plain_torch():
    from tests.conftest import free_port

    temperature = 0.7
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_tp_rank, args=(free_port(), temperature, out), nprocs=2, join=True)
        res = dict(out)
    logits, target, w1, w2 = _inputs()
    ref_logp, ref_ent, ref_grad = _plain(logits, target, temperature, w1, w2)
    for rank in (0, 1):
        logp, ent, grad = res[rank]
        assert (logp - ref_logp).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
        assert (grad - ref_grad[..., rank * PADDED // 2:(rank + 1) * PADDED // 2]).abs().max() < 1e-5

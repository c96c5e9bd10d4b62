"""The engine's metric reduction convention (sums; ``*_max`` / ``*_min`` extrema), the mismatch
maximum that policy_objective reports under it, and the loop taking the rollout mismatch from the
first policy epoch. The reduction over real DP/TP ranks is in tests/distributed/test_colocate.py."""
from __future__ import annotations

import pytest
import torch

from megatron_tppo.algorithms.objectives import policy_objective
from megatron_tppo.config_io import load_config
from megatron_tppo.controller.loop import TPPOLoop, Task
from megatron_tppo.monitoring import NullLogger
from megatron_tppo.training.metrics import pack_metrics, reduction, unpack_metrics


def test_reduction_by_suffix():
    assert reduction("logprob_abs_diff_max") == "max"
    assert reduction("ratio_min") == "min"
    assert reduction("loss") == reduction("logprob_abs_diff") == reduction("max_len") == "sum"


def _reduce(stores: list[list[dict]]) -> dict:
    """What the engine does: pack per rank, SUM / MAX across ranks, unpack."""
    keys = sorted(stores[0][0])
    packed = [pack_metrics(s, keys, "cpu") for s in stores]
    vsum = torch.stack([p[0] for p in packed]).sum(0)
    vext = torch.stack([p[1] for p in packed]).max(0).values
    return unpack_metrics(keys, vsum, vext)


def test_pack_unpack_sums_and_extrema_over_micro_batches_and_ranks():
    t = torch.tensor
    rank0 = [{"loss": t(1.0), "d_max": t(0.5), "r_min": t(0.9)}, {"loss": t(2.0), "d_max": t(3.0), "r_min": t(0.7)}]
    rank1 = [{"loss": t(0.5), "d_max": t(1.0), "r_min": t(-0.2)}]
    assert _reduce([rank0, rank1]) == {"loss": 3.5, "d_max": 3.0, "r_min": pytest.approx(-0.2)}
    # a rank without micro-batches contributes the identities
    vsum, vext = pack_metrics([], ["loss", "d_max", "r_min"], "cpu")
    assert vsum.tolist() == [0.0] and vext.tolist() == [float("-inf")] * 2


def _policy_batch(seed: int = 0, b: int = 6, t: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[:, 0] = 0
    return {"loss_mask": mask, "old_logprobs": -2 + torch.randn(b, t, generator=g),
            "advantages": torch.randn(b, t, generator=g)}


def test_mismatch_max_survives_any_micro_batch_split():
    mb = _policy_batch()
    logp = mb["old_logprobs"] + torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    logp = torch.where(mb["loss_mask"] > 0, logp, logp + 100.0)  # huge off-mask differences must not count
    n = float(mb["loss_mask"].sum())
    _, full = policy_objective({"logprobs": logp}, mb, n)
    want = ((logp - mb["old_logprobs"]).abs() * mb["loss_mask"]).max().item()
    assert full["logprob_abs_diff_max"].item() == pytest.approx(want)
    parts = [policy_objective({"logprobs": logp[i:i + 2]}, {k: v[i:i + 2] for k, v in mb.items()}, n)[1]
             for i in range(0, 6, 2)]
    reduced = _reduce([parts[:2], parts[2:]])  # 2 "ranks", micro-batches of 2 rows
    assert reduced["logprob_abs_diff_max"] == pytest.approx(want)
    assert reduced["logprob_abs_diff"] == pytest.approx(full["logprob_abs_diff"].item(), rel=1e-6)
    # a micro-batch without loss tokens reports 0: it cannot win the max
    empty = {k: v[:2] * 0 if k == "loss_mask" else v[:2] for k, v in mb.items()}
    assert policy_objective({"logprobs": logp[:2]}, empty, n)[1]["logprob_abs_diff_max"].item() == 0.0


class _EpochPolicy:
    """A stand-in trainer group that reports each epoch's metrics (the loop's bookkeeping only)."""

    def __init__(self):
        self.epoch = 0

    def _metrics(self) -> dict:
        self.epoch += 1
        return {"loss": float(self.epoch), "logprob_abs_diff": 0.01 * self.epoch,
                "logprob_abs_diff_max": 0.1 * self.epoch}

    def wait_train(self, refs) -> dict:
        return self._metrics()

    def train_step(self, *args, **kwargs) -> dict:
        return self._metrics()


def test_rollout_mismatch_comes_from_the_first_epoch():
    cfg = load_config("examples/tiny_cpu.yaml", ["algorithm.policy_epochs=3"])
    task = Task(prompts=iter([]), eval_prompts=[], decode=str, score=lambda text, meta: (0.0, None))
    loop = TPPOLoop(cfg, _EpochPolicy(), None, None, task, NullLogger())
    b = {"attention_mask": torch.ones(2, 4)}
    m = loop.finish_policy_update(None, b, 8.0, {}, 0.0)
    assert m["rollout/logprob_mismatch_max"] == pytest.approx(0.1)  # epoch 1, before any update
    assert m["rollout/logprob_mismatch_mean"] == pytest.approx(0.01)
    assert m["policy/loss"] == 3.0 and m["policy/logprob_abs_diff_max"] == pytest.approx(0.3)  # last epoch

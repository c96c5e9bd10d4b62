"""A NaN loss skips the update (weights unchanged, counted); the next finite step trains."""
import sys

import torch

from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
from megatron_tppo.training import TrainEngine, init_parallel
from megatron_tppo.weights.gather import iter_full_params


def main(out: str) -> None:
    init_parallel(1, 1, "cpu")
    m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    vocab_size=100, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    b = {"tokens": torch.randint(0, 100, (3, 16), generator=g), "loss_mask": torch.ones(3, 16),
         "adv": torch.randn(3, 16, generator=g)}
    b["loss_mask"][:, 0] = 0

    def loss(o, mb, n):
        return (-(o["logprobs"] * mb["adv"]) * mb["loss_mask"]).sum() / n, {}

    def nan_loss(o, mb, n):
        return loss(o, mb, n)[0] * float("nan"), {}

    e = TrainEngine(m, LayoutConfig(), OptimizerConfig(lr=1e-3), seed=3)
    before = {k: v.clone() for k, v in iter_full_params(e.module)}
    bad = e.train_step(b, nan_loss, 45.0)
    after_bad = {k: v.clone() for k, v in iter_full_params(e.module)}
    good = e.train_step(b, loss, 45.0)
    after_good = dict(iter_full_params(e.module))
    torch.save({"bad": bad, "good": good, "unchanged": all(torch.equal(before[k], after_bad[k]) for k in before),
                "finite": all(torch.isfinite(v).all().item() for v in after_good.values()),
                "moved": any(not torch.equal(before[k], after_good[k]) for k in before), "steps": e.steps},
               out + "/nan.pt")


if __name__ == "__main__":
    main(sys.argv[1])

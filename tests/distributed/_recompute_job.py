"""Train step with recompute=none vs full in one process (TP=1): loss, grad norm and new weights agree."""
import sys
import torch
from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
from megatron_tppo.training import TrainEngine, init_parallel
init_parallel(1,1,'cpu')
m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=100, max_position_embeddings=64)
g = torch.Generator().manual_seed(0)
b = {"tokens": torch.randint(0,100,(3,16),generator=g), "loss_mask": torch.ones(3,16), "adv": torch.randn(3,16,generator=g)}
b["loss_mask"][:,0]=0
def loss(o, mb, n): return (-(o["logprobs"]*mb["adv"])*mb["loss_mask"]).sum()/n, {}
out = {}
for rc in ("none","full"):
    e = TrainEngine(m, LayoutConfig(recompute=rc), OptimizerConfig(lr=1e-3), seed=3)
    r = e.train_step(b, loss, float(b["loss_mask"].sum()))
    out[rc] = (r["loss"], r["grad_norm"], e.forward(b)["logprobs"])
torch.save({k: v for k, v in out.items()}, sys.argv[1] + "/recompute.pt")

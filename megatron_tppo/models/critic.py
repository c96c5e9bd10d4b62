"""The critic (value model): the policy's backbone with a scalar value head instead of the LM head.

The head is a replicated ``Linear(hidden, 1)`` with a bias: tiny, so it is not split across tensor
parallel ranks. Its input (the final-norm hidden states) is identical on every TP rank (no sequence
parallelism), so each rank computes the same values and the same head gradients, exactly like
megatron's replicated norm weights. It replaces GPTModel's ``output_layer`` and honours the same
call convention, so GPTModel's forward then returns values [B, T, 1] on the last stage.
"""
from __future__ import annotations

import torch

from megatron_tppo.config import ModelConfig
from megatron_tppo.models.gpt import _TAG_VALUE_HEAD, build_gpt, derive_seed


class ValueHead(torch.nn.Module):
    """Scalar head: hidden [T, B, H] -> values [T, B, 1] (fp32 weights are cast to the input dtype)."""

    def __init__(self, hidden_size: int, init_std: float, seed: int, dtype: torch.dtype):
        super().__init__()
        weight = torch.empty(1, hidden_size, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(weight, mean=0.0, std=init_std, generator=gen)
        self.weight = torch.nn.Parameter(weight.to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        # Same signature and (output, bias) return as megatron's ColumnParallelLinear output layer.
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def build_critic(m: ModelConfig, device: str, seed: int, *, recompute: str = "none", init_weights: bool = True):
    """This rank's pipeline stage of the critic: GPT backbone (untied) + :class:`ValueHead`.

    The backbone is drawn from ``seed`` exactly like the policy's (so a critic and a policy built
    from the same seed share backbone weights); the head has its own derived seed (drawn also
    with ``init_weights=False``, which skips the backbone's: an HF load keeps the fresh head).
    """
    model = build_gpt(m, device, seed, tie_embeddings=False, recompute=recompute, init_weights=init_weights)
    if model.post_process:
        dtype = model.output_layer.weight.dtype
        head = ValueHead(m.hidden_size, m.init_std, derive_seed(seed, _TAG_VALUE_HEAD), dtype)
        if device == "cuda":
            head = head.cuda(torch.cuda.current_device())
        model.output_layer = head  # drops the vocab-sized LM head this stage built
    return model


def copy_backbone(policy, critic) -> int:
    """Copy every policy weight except the LM head into ``critic`` (same TP/PP layout, same rank).

    ``policy``/``critic``: unwrapped GPTModels of one pipeline stage. Returns the number of copied
    tensors. For a critic at another layout, load the backbone from a policy checkpoint instead
    (:func:`megatron_tppo.training.checkpoint.load_backbone`).
    """
    src = policy.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in critic.state_dict(keep_vars=True).items():
            if name.startswith("output_layer.") or name.endswith("_extra_state"):
                continue
            if name not in src:
                raise KeyError(f"critic weight {name!r} has no policy counterpart")
            if src[name].shape != tensor.shape:
                raise ValueError(f"{name}: policy shape {tuple(src[name].shape)} != critic {tuple(tensor.shape)}")
            tensor.copy_(src[name])
            copied += 1
    return copied

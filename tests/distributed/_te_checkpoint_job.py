"""Checkpoints across layer specs and optimizer step layouts, in one process (TP=1, CPU, gloo).

``python -m tests.distributed._te_checkpoint_job <out_dir>`` writes ``<out_dir>/te_checkpoint.pt``:
{check: result}, read by tests/distributed/test_te_checkpoint.py.

Transformer Engine cannot be imported without CUDA, so its two layouts are reproduced here:

* TE modules' extra state: a module whose ``get_extra_state`` returns a uint8 tensor (empty without
  FP8 state) and whose ``set_extra_state`` takes it back, as TE's modules do
  (TransformerEngineBaseModule in transformer_engine/pytorch/module/base.py; te.pytorch.RMSNorm is
  an ops.BasicOperation, which has the same pair). Given to the local model's final norm (a torch
  norm, where the TE spec has TE's RMSNorm), megatron's own ``sharded_state_dict_default`` turns it
  into a ``decoder.final_layernorm._extra_state`` ShardedObject; per-layer entries are added to a
  request with megatron's ``make_sharded_object_for_checkpoint`` and the layer offsets
  TransformerBlock uses.
* FusedAdam's step layout: :class:`FusedAdamLayout` (see its docstring).
"""
from __future__ import annotations

import pickle
import sys

import torch

from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
from megatron_tppo.training import TrainEngine, init_parallel, load_backbone
from megatron_tppo.training import checkpoint as ckpt
from megatron_tppo.weights.gather import iter_full_params

M = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                vocab_size=100, max_position_embeddings=64)
OPT = OptimizerConfig(lr=1e-3, weight_decay=0.1)
FP8_STATE = torch.frombuffer(bytearray(pickle.dumps({"recipe": "delayed", "amax_history_fwd": [1.5, 2.5]})),
                             dtype=torch.uint8)


def give_te_extra_state(module: torch.nn.Module, state: torch.Tensor | None = None) -> torch.nn.Module:
    """Give ``module`` TE's extra-state interface; ``module.loaded_extra_state`` records the load."""

    class WithTEExtraState(type(module)):
        def get_extra_state(self):
            return self.te_extra_state

        def set_extra_state(self, value):
            self.loaded_extra_state = value

    module.__class__ = WithTEExtraState
    module.te_extra_state = torch.empty(0, dtype=torch.uint8) if state is None else state
    module.loaded_extra_state = None
    return module


class FusedAdamLayout(torch.optim.Optimizer):
    """AdamW with the state layout of Transformer Engine's FusedAdam (non-capturable, fp32 states,
    no master weights), which cannot be imported on CPU. As in TE's fused_adam.py: the step count is
    ``group["step"]``, an int made by the first step and handed to the fused kernel, which takes an
    int; per-parameter state holds exp_avg and exp_avg_sq only; state_dict() looks every state key
    up in ``name_to_dtype_map``, so any other key raises KeyError there."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                                  "master_param": torch.float32}

    def get_unscaled_state(self, param, name):
        assert self.name_to_dtype_map[name] == torch.float32
        return self.state[param][name]

    def state_dict(self):
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        sd["state"] = {i: {name: self.get_unscaled_state(params[i], name) for name in s}
                       for i, s in sd["state"].items()}
        return sd

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group["step"] + 1 if "step" in group else 1
            if not isinstance(group["step"], int):
                raise TypeError(f"the fused Adam kernel takes an int step, got {group['step']!r}")
            t, (b1, b2) = group["step"], group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))


def batch():
    g = torch.Generator().manual_seed(0)
    b = {"tokens": torch.randint(0, M.vocab_size, (3, 16), generator=g), "loss_mask": torch.ones(3, 16),
         "adv": torch.randn(3, 16, generator=g)}
    b["loss_mask"][:, 0] = 0
    return b


def loss(o, mb, n):
    return (-(o["logprobs"] * mb["adv"]) * mb["loss_mask"]).sum() / n, {}


def params(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in iter_full_params(engine.module)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def error_of(fn) -> str:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        fn()
    except (Exception, CheckpointException) as e:  # the test reads the type and the message
        return f"{type(e).__name__}: {e}"
    return ""


def te_style_request(engine) -> tuple[dict, set[str]]:
    """The model request of ``engine`` plus per-layer TE extra state (core attention, FP8 metadata),
    made as TransformerBlock makes them: sharded key without the layer number, layer offset."""
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    sd = engine.module.sharded_state_dict()
    added = set()
    for i in range(M.num_layers):
        key = f"decoder.layers.{i}.self_attention.core_attention._extra_state"
        sd[key] = make_sharded_object_for_checkpoint(torch.empty(0, dtype=torch.uint8),
                                                     "decoder.layers.self_attention.core_attention._extra_state",
                                                     ((0, i, M.num_layers),))
        added.add(key)
    return sd, added


def extra_state_checks(out: str, r: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    src = TrainEngine(M, LayoutConfig(), OPT, seed=3)
    src.train_step(batch(), loss, 45.0)
    local_ckpt = f"{out}/local_spec"
    src.save(local_ckpt)
    ref = params(src)
    ref_sd = {k: v.clone() for k, v in src.module.state_dict().items() if not k.endswith("_extra_state")}

    # request level: the local checkpoint into a request carrying TE's per-layer extra state
    dst = TrainEngine(M, LayoutConfig(), OPT, seed=99)
    request, added = te_style_request(dst)
    r["plain_load_error"] = error_of(lambda: dist_checkpointing.load({"model": dict(request)}, local_ckpt))
    loaded, dropped = ckpt.load_sharded({"model": request}, local_ckpt)
    r["dropped"], r["added"] = sorted(dropped), sorted(added)
    r["request_extra_state_kept"] = sorted(k for k in loaded["model"] if k.endswith("_extra_state"))
    r["request_max_diff"] = max_diff({k: v for k, v in loaded["model"].items() if k in ref_sd}, ref_sd)

    # a missing entry that is not extra state still fails
    request, _ = te_style_request(dst)
    w = request["decoder.final_layernorm.weight"]
    request["decoder.final_layernorm.bias"] = ShardedTensor.from_rank_offsets(
        "decoder.final_layernorm.bias", torch.zeros(M.hidden_size), replica_id=w.replica_id)
    r["missing_tensor_error"] = error_of(lambda: ckpt.load_sharded({"model": request}, local_ckpt))

    # engine level: local checkpoint -> model with a TE-style final norm, optimizer included
    te = TrainEngine(M, LayoutConfig(), OPT, seed=99)
    give_te_extra_state(te.module.decoder.final_layernorm)
    r["te_request_has_norm_extra_state"] = "decoder.final_layernorm._extra_state" in te.module.sharded_state_dict()
    te.load(local_ckpt)
    r["te_load_max_diff"] = max_diff(params(te), ref)
    r["te_norm_loaded"] = te.module.decoder.final_layernorm.loaded_extra_state
    te.train_step(batch(), loss, 45.0)
    src.train_step(batch(), loss, 45.0)
    r["te_after_step_max_diff"] = max_diff(params(te), params(src))

    # a checkpoint holding TE extra state hands it to the module (not dropped)
    te_src = TrainEngine(M, LayoutConfig(), OPT, seed=5)
    give_te_extra_state(te_src.module.decoder.final_layernorm, FP8_STATE.clone())
    te_ckpt = f"{out}/te_spec"
    te_src.save(te_ckpt)
    te_dst = TrainEngine(M, LayoutConfig(), OPT, seed=7)
    norm = give_te_extra_state(te_dst.module.decoder.final_layernorm)
    te_dst.load(te_ckpt)
    r["te_extra_state_loaded"] = norm.loaded_extra_state
    r["te_to_te_max_diff"] = max_diff(params(te_dst), params(te_src))
    # ... and the local spec, which has no such module, ignores it
    local_dst = TrainEngine(M, LayoutConfig(), OPT, seed=7)
    local_dst.load(te_ckpt)
    r["te_to_local_max_diff"] = max_diff(params(local_dst), params(te_src))

    # a critic with a TE-style norm from the local policy checkpoint
    critic = TrainEngine(M, LayoutConfig(), OPT, role="critic", seed=11)
    give_te_extra_state(critic.module.decoder.final_layernorm)
    load_backbone(critic, local_ckpt)
    got = params(critic)
    r["backbone_max_diff"] = max_diff({k: v for k, v in got.items() if not k.startswith("output_layer.")},
                                      {k: v for k, v in ref.items() if k in got and not k.startswith("output_layer.")})


def torch_adam_checks(r: dict) -> None:
    primed = TrainEngine(M, LayoutConfig(), OPT, seed=3)
    fresh = TrainEngine(M, LayoutConfig(), OPT, seed=3)
    ckpt._prime_optimizer_state(primed.optimizer)
    inners = [inner for _, inner in ckpt._inner_optimizers(primed.optimizer)]
    r["torch_inner_types"] = sorted({type(i).__name__ for i in inners})
    states = [inner.state[p] for inner in inners for g in inner.param_groups for p in g["params"]]
    r["torch_state_keys"] = sorted({k for s in states for k in s})
    r["torch_steps"] = sorted({float(s["step"]) for s in states})
    r["torch_group_has_step"] = any("step" in g for inner in inners for g in inner.param_groups)
    primed.train_step(batch(), loss, 45.0)
    fresh.train_step(batch(), loss, 45.0)
    r["torch_primed_vs_fresh"] = max_diff(params(primed), params(fresh))
    r["torch_steps_after"] = sorted({float(s["step"]) for s in states})


def fused_adam_layout_checks(r: dict) -> None:
    engine = TrainEngine(M, LayoutConfig(), OPT, seed=3)
    stand_ins = []
    for opt, inner in ckpt._inner_optimizers(engine.optimizer):
        g0 = inner.param_groups[0]
        stand_in = FusedAdamLayout([torch.zeros(1, requires_grad=True)], lr=g0["lr"], betas=g0["betas"],
                                   eps=g0["eps"], weight_decay=g0["weight_decay"])
        # the main-param shards are views: assigned as DistributedOptimizer assigns them to its own
        stand_in.param_groups = [dict(g) for g in inner.param_groups]
        opt.optimizer = stand_in
        stand_ins.append(stand_in)
    ckpt._prime_optimizer_state(engine.optimizer)  # megatron's init_state_fn fills the moments
    groups = [g for s in stand_ins for g in s.param_groups if g["params"]]
    r["fused_group_steps"] = sorted({(type(g["step"]).__name__, g["step"]) for g in groups})
    r["fused_state_keys"] = sorted({k for s in stand_ins for st in s.state.values() for k in st})
    r["fused_state_dict_error"] = error_of(lambda: [s.state_dict() for s in stand_ins])

    # one step of the primed optimizer equals one of a fresh one (and of torch AdamW)
    opt = stand_ins[0]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for grp in opt.param_groups for p in grp["params"]]
    copies = [[p.detach().clone().requires_grad_() for p in grp["params"]] for grp in opt.param_groups]
    hyper = [{k: grp[k] for k in ("lr", "betas", "eps", "weight_decay")} for grp in opt.param_groups]
    fresh = FusedAdamLayout([{"params": c, **h} for c, h in zip(copies, hyper)])
    torch_ref = torch.optim.AdamW([{"params": [p.detach().clone().requires_grad_() for p in c], **h}
                                   for c, h in zip(copies, hyper)])
    for o in (opt, fresh, torch_ref):
        for p, grad in zip([p for grp in o.param_groups for p in grp["params"]], grads):
            p.grad = grad.clone()
        o.step()
    flat = [[p.detach() for grp in o.param_groups for p in grp["params"]] for o in (opt, fresh, torch_ref)]
    r["fused_primed_vs_fresh"] = max((a - b).abs().max().item() for a, b in zip(flat[0], flat[1]))
    r["fused_vs_torch_adamw"] = max((a - b).abs().max().item() for a, b in zip(flat[1], flat[2]))
    r["fused_steps_after"] = sorted({grp["step"] for grp in opt.param_groups if grp["params"]})

    # a checkpoint written with torch Adam carries a float group step: restored as an int
    for grp in opt.param_groups:
        grp["step"] = 2.0
    r["fused_float_step_error"] = error_of(opt.step)
    for grp in opt.param_groups:
        grp["step"] = 2.0
    ckpt._restore_step_layout(engine.optimizer)
    r["fused_restored_steps"] = sorted({(type(grp["step"]).__name__, grp["step"]) for grp in opt.param_groups
                                        if grp["params"]})
    r["fused_restored_step_error"] = error_of(opt.step)


def main(out: str) -> None:
    init_parallel(1, 1, "cpu")
    r: dict = {}
    extra_state_checks(out, r)
    torch_adam_checks(r)
    fused_adam_layout_checks(r)
    torch.save(r, f"{out}/te_checkpoint.pt")


if __name__ == "__main__":  # the checkpoint writer starts processes (spawn)
    main(sys.argv[1])

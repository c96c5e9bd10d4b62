"""torch_dist checkpoints of an engine (megatron-core dist_checkpointing), reshardable across layouts.

Layout of the saved state dict::

    {"model": <GPTModel sharded_state_dict>,
     "optimizer": <optimizer sharded_state_dict>,        # only with_optimizer
     "scheduler": OptimizerParamScheduler.state_dict(),  # common (rank 0) state
     "steps": int, "role": "policy" | "critic"}

Sharded tensors are keyed by global names (layer numbers include the pipeline offset, TP splits
are described by their global offsets), so a checkpoint saved at one TP/PP/DP loads at another.
The distributed optimizer is saved in megatron's ``fully_reshardable`` format (a canonical
per-parameter state gathered on DP rank 0), so its state also loads at another DP/TP/PP layout.
megatron-core 0.16.1's default, ``fully_sharded_model_space``, fails on save ("ShardedTensor.
flattened_range is not supported").

Checkpoints load across layer specs: the local (pure torch) spec of a CPU conversion and the
Transformer Engine spec of a GPU run hold the same tensors, but TE modules with no local
counterpart that has extra state (TE's norms, e.g. ``decoder.final_layernorm``) request
``*._extra_state`` objects (FP8 metadata) that a local-spec checkpoint lacks; those are left out of
the load request (the modules keep their fresh FP8 metadata). Any other requested entry the
checkpoint lacks fails the load before anything is read.

The optimizer step counter follows the inner optimizer's layout: torch Adam counts per parameter
(``state[p]["step"]``, a tensor), Transformer Engine's and Apex's FusedAdam count once per param
group (``group["step"]``, an int) and keep only moments (and master weights) per parameter.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_sharded_state_dict(engine):
    return engine.module.sharded_state_dict()


def save_checkpoint(engine, ckpt_dir: str, with_optimizer: bool = True) -> None:
    """Collective over all ranks of the job; ``ckpt_dir`` is created (must be empty or absent)."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    model_sd = _model_sharded_state_dict(engine)
    state = {"model": model_sd, "steps": engine.steps, "role": engine.role}
    if with_optimizer and engine.optimizer is not None:
        # an optimizer that has not stepped yet (a critic before its first finished response, a
        # policy during critic warm-up) has no Adam state, which megatron's state_dict rejects
        _prime_optimizer_state(engine.optimizer)
        state["optimizer"] = engine.optimizer.sharded_state_dict(model_sd, metadata=_OPT_METADATA)
        state["scheduler"] = engine.scheduler.state_dict()
    dist_checkpointing.save(state, ckpt_dir, sharded_strategy=_fully_parallel_save_strategy())
    dist.barrier()


def _fully_parallel_save_strategy():
    """torch_dist, with each replicated shard written once by one of its holders, chosen to
    spread the bytes evenly over the ranks (megatron-core's FullyParallelSaveStrategyWrapper;
    only metadata is exchanged). Without it the first replica (DP rank 0) writes every
    replicated tensor while the other DP ranks idle."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist", 1))


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield opt, inner


def _counts_steps_per_parameter(inner) -> bool:
    """True for torch Adam/AdamW (``state[p]["step"]``, one tensor per parameter); False for the
    fused Adams megatron picks when Transformer Engine or Apex is installed, which count in
    ``group["step"]`` and fail on any other per-parameter state key than their moments (TE's
    FusedAdam.state_dict looks every key up in its dtype map)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _prime_optimizer_state(optimizer) -> None:
    """Give a fresh (never stepped) optimizer zero Adam state at step 0, in its own step layout.

    Building the sharded optimizer state dict (to save, or as the loading request) needs Adam
    moments for every parameter, and megatron's DistributedOptimizer.state_dict() reads one common
    step: without Apex/TE from torch Adam's per-parameter state, with them from the param groups.
    Step 0 then advances to 1 on the first real step, as in a fresh optimizer; a load overwrites
    all of it.
    """
    for opt, inner in _inner_optimizers(optimizer):
        if all(len(inner.state[p]) for g in inner.param_groups for p in g["params"]):
            continue
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            if not group["params"]:
                continue
            if _counts_steps_per_parameter(inner):
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))
            else:
                group.setdefault("step", 0)


@contextlib.contextmanager
def _copy_only_saved_state_keys(optimizer):
    """Work around a megatron-core 0.16.1 bug when loading ``fully_reshardable`` optimizer state.

    Without Apex/TE, DistributedOptimizer.load_state_dict first puts torch Adam's per-parameter
    "step" into the state, then load_parameter_state_from_fully_reshardable copies *every* state
    key from the checkpoint's per-parameter tensors, which carry no "step" (it is restored per
    group) -> KeyError('step'). While loading, copy only the keys the checkpoint holds.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states") or opt.config.use_precision_aware_optimizer:
            continue

        def set_states(model_param, tensors, opt=opt):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **opt.optimizer.state[main_param]}
            for key, value in tensors.items():
                dst[key].copy_(value)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _restore_step_layout(optimizer) -> None:
    """Put the loaded step counter back into the inner optimizer's own layout.

    torch Adam: megatron-core 0.16.1 (without Apex/TE) restores the step by putting ONE tensor into
    every parameter's state, and torch Adam increments ``state["step"]`` in place per parameter, so
    the shared counter would advance once per parameter per step and corrupt the bias correction:
    each parameter gets its own copy. FusedAdam: the param groups come from the checkpoint as they
    were saved, and a checkpoint written with torch Adam holds a float step there, which FusedAdam
    would pass on to its fused kernel; it takes an int.
    """
    for _, inner in _inner_optimizers(optimizer):
        if _counts_steps_per_parameter(inner):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        else:
            for group in inner.param_groups:
                if isinstance(group.get("step"), float):
                    group["step"] = int(group["step"])


def load_sharded(request: dict, ckpt_dir: str) -> tuple[dict, set[str]]:
    """``dist_checkpointing.load`` of ``request`` ({"model": flat sharded state dict, ...}) that
    leaves out the model's ``*._extra_state`` objects the checkpoint does not hold.

    Returns the loaded state dict and the model state-dict keys left out. Any other requested
    entry the checkpoint lacks raises megatron's CheckpointingException ("Unexpected keys (not
    found in the checkpoint)", naming them) before anything is read.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = request["model"]
    extra = {k: v for k, v in model.items() if isinstance(v, ShardedObject) and v.key.endswith("_extra_state")}
    dropped: set[str] = set()
    if extra:
        saved = {v.key for v in load_sharded_metadata(ckpt_dir).values()}
        dropped = {k for k, v in extra.items() if v.key not in saved}
    request = {**request, "model": {k: v for k, v in model.items() if k not in dropped}}
    return dist_checkpointing.load(request, ckpt_dir, strict=StrictHandling.RAISE_UNEXPECTED), dropped


def _load_module_state(module, state: dict, ckpt_dir: str, may_miss=lambda key: False) -> None:
    """``module.load_state_dict`` that lets modules keep extra state the checkpoint did not hold.

    A ``*._extra_state`` key absent from ``state`` (left out by :func:`load_sharded`, or never
    requested by the module's sharded state dict) leaves that module's FP8 metadata as it is; every
    other missing key (except those ``may_miss`` accepts) and every unexpected key raises.
    """
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state") and not may_miss(k)]
    if missing or unexpected:
        raise KeyError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")


def load_checkpoint(engine, ckpt_dir: str, with_optimizer: bool = True) -> None:
    """Load model (+ optimizer/scheduler when saved and asked for) into ``engine`` (collective)."""
    model_sd = _model_sharded_state_dict(engine)
    request = {"model": model_sd}
    load_opt = with_optimizer and engine.optimizer is not None
    if load_opt:
        _prime_optimizer_state(engine.optimizer)
        request["optimizer"] = engine.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                 metadata=_OPT_METADATA)
    loaded, _ = load_sharded(request, ckpt_dir)
    _load_module_state(engine.module, loaded["model"], ckpt_dir)
    if load_opt and "optimizer" in loaded:
        with _copy_only_saved_state_keys(engine.optimizer):
            engine.optimizer.load_state_dict(loaded["optimizer"])
        _restore_step_layout(engine.optimizer)
        if "scheduler" in loaded:
            engine.scheduler.load_state_dict(loaded["scheduler"])
        engine.steps = int(loaded.get("steps", 0))
    elif engine.optimizer is not None:
        engine.optimizer.reload_model_params()  # main (fp32/sharded) params follow the new weights


def load_backbone(engine, ckpt_dir: str) -> None:
    """Initialize a critic from a policy checkpoint: every weight except the LM head (any layout).

    The value head keeps its own initialization; optimizer state is not loaded.
    """
    model_sd = {k: v for k, v in _model_sharded_state_dict(engine).items()
                if not k.startswith("output_layer.")}
    loaded, _ = load_sharded({"model": model_sd}, ckpt_dir)
    _load_module_state(engine.module, loaded["model"], ckpt_dir, may_miss=lambda k: k.startswith("output_layer."))
    if engine.optimizer is not None:
        engine.optimizer.reload_model_params()


def copy_backbone_into(critic_engine, policy_engine) -> int:
    """In-process variant of :func:`load_backbone` for a policy of the same layout in this process."""
    from megatron_tppo.models import copy_backbone

    copied = copy_backbone(policy_engine.module, critic_engine.module)
    if critic_engine.optimizer is not None:
        critic_engine.optimizer.reload_model_params()
    return copied

"""One training engine for the policy and the critic: forward, train_step(batch, loss_fn), checkpoints.

The engine knows forward/backward/optimizer step; the algorithm knows the loss (injected as
``loss_fn``, verl-style). Build it inside an initialized process group with parallel_state set up
(:func:`megatron_tppo.training.parallel.init_parallel`).

Batch (a plain dict of tensors, this data-parallel rank's rows; every TP/PP rank of one model
replica passes the same rows, see :func:`~megatron_tppo.training.batching.split_for_data_parallel`):

- ``tokens`` [B, T] long, right padded; rows start at position 0 (megatron's RoPE uses 0..T-1, so
  ``position_ids`` [B, T], if given, is passed to the model but must be the plain arange).
- ``attention_mask`` [B, T] optional, 1 = real token; it sets each row's length for micro-batching.
- ``loss_mask`` [B, T] (train_step): 1 on tokens that carry loss.
- any other [B, T] (or [B]) fields the loss_fn reads (old log-probs, advantages, returns, ...).

Alignment convention: every per-token output at index t describes **token t**:
``logprobs[b, t] = log p(tokens[b, t] | tokens[b, :t])``, computed from the model output at
position t-1; ``entropy[b, t]`` is the entropy of that same next-token distribution (at t-1);
``values[b, t]`` is the critic's output at position t-1, i.e. V of the state in which token t was
chosen. Index 0 has no predecessor: its outputs are 0 and it must never carry loss. The critic's
forward also returns ``values_after[b, t]``, its output at t: V of the state after token t (the
exact bootstrap after a row's last token).
``temperature`` (forward, train_step): the policy's log-probs and entropy are those of
softmax(logits / temperature), the distribution the behaviour log-probs were taken from
(``RolloutConfig.logprob_temperature``); the critic ignores it.

Loss contract. ``loss_fn(outputs, micro_batch, global_num_tokens) -> (loss, metrics)``:
``outputs`` holds ``logprobs`` (+ ``entropy`` when the engine was asked for it) or ``values``,
each [b, t] aligned with ``micro_batch``'s fields (same rows, cut to the micro-batch width).
``loss`` must be this micro-batch's SUM over its loss tokens divided by ``global_num_tokens`` (the
caller's count of loss tokens over all DP ranks), so the total is independent of micro-batch
size, DP and PP. ``metrics`` are scalar tensors with the same additive semantics (the engine sums
them over micro-batches and DP ranks); divide by the global count inside loss_fn to get means.
Keys ending in ``_max`` / ``_min`` are extrema instead, max/min-reduced over micro-batches and DP
ranks (:mod:`megatron_tppo.training.metrics`).
Megatron divides each micro-batch loss by the number of micro-batches and DDP averages gradients
over DP; the engine multiplies by both so that the gradient is d(sum of loss_fn losses).

Optimizer: megatron's DistributedOptimizer (Adam) at every DP size (at DP=1 it owns the whole
state), gradient clipping by global norm, OptimizerParamScheduler for warm-up and decay.
Micro-batches: length-sorted, bounded by ``LayoutConfig.micro_batch_tokens`` padded tokens
(:mod:`megatron_tppo.training.batching`); 1F1B schedule when PP > 1.

Colocation: :meth:`TrainEngine.offload` frees the device memory of parameters, gradients and
optimizer state (kept in one host buffer; gradients may be dropped instead, since train_step
zeroes them) and :meth:`TrainEngine.onload` restores it bit-identically
(:mod:`megatron_tppo.training.offload`); the engine refuses to compute in between.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_tppo.config import LayoutConfig, ModelConfig, OptimizerConfig
from megatron_tppo.training.batching import fp8_alignment, row_lengths, split_micro_batches
from megatron_tppo.training.metrics import pack_metrics, unpack_metrics
from megatron_tppo.training.offload import KINDS, StorageOffloader, engine_tensors, release_scratch_buffers
from megatron_tppo.training.vocab_parallel import vocab_parallel_logprobs

LossFn = Callable[[dict, dict, float], tuple[torch.Tensor, dict]]


class TrainEngine:
    """A megatron-core GPT policy (``role="policy"``) or critic (``role="critic"``) with its optimizer.

    ``total_steps`` sets the LR decay horizon when ``optim.lr_decay_steps`` is 0. ``with_optimizer``
    False builds a forward-only model (e.g. a reference policy). ``init_weights`` False skips the
    random initialization (parameters NaN, allocated on ``device``; :func:`~megatron_tppo.models.build_gpt`)
    for a caller that loads every weight next (:meth:`load`, or an HF load + :meth:`weights_changed`).
    """

    def __init__(self, model_cfg: ModelConfig, layout: LayoutConfig, optim: OptimizerConfig, *,
                 role: str = "policy", device: str = "cpu", seed: int = 1234, total_steps: int = 1,
                 with_optimizer: bool = True, pad_to_multiple: Optional[int] = None, init_weights: bool = True):
        from megatron.core import parallel_state as ps

        from megatron_tppo.models import build_critic, build_gpt

        if role not in ("policy", "critic"):
            raise ValueError(f"role must be 'policy' or 'critic', got {role!r}")
        self.model_cfg, self.layout, self.optim_cfg = model_cfg, layout, optim
        self.role, self.device, self.seed = role, device, seed
        got = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if got != (layout.tensor_parallel, layout.pipeline_parallel):
            raise ValueError(f"parallel_state has (tp, pp)={got}, layout asks for "
                             f"({layout.tensor_parallel}, {layout.pipeline_parallel})")
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
        # FP8 GEMMs need token counts divisible by 16 (32 for MXFP8); elsewhere keep micro-batches tight
        self.pad_to_multiple = pad_to_multiple or fp8_alignment(model_cfg.fp8, model_cfg.fp8_recipe)

        build = build_critic if role == "critic" else build_gpt
        model = build(model_cfg, device, seed, recompute=layout.recompute, init_weights=init_weights)
        self.module = model  # the unwrapped GPTModel of this pipeline stage
        self.config = model.config
        wrapped = model
        if self.config.bf16 or self.config.fp16:
            from megatron.core.transformer.module import Float16Module

            # megatron's half-precision wrapper: fp32 outputs on the last stage, half inside
            wrapped = Float16Module(self.config, model)
        self.optimizer = self.scheduler = None
        self.steps = 0
        self._offloader = StorageOffloader(device)
        if with_optimizer:
            self._setup_optimizer(wrapped, total_steps)
        else:
            self.model = wrapped

    # ------------------------------------------------------------------ setup

    def _setup_optimizer(self, model, total_steps: int) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as MOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, m = self.optim_cfg, self.model_cfg
        # Always megatron's distributed optimizer (at DP=1 it simply owns the whole state): one
        # checkpoint format for every layout. A DistributedOptimizer checkpoint does not load into
        # megatron's plain FP32Optimizer (param-group keys differ in 0.16.1), so mixing the two
        # would tie a checkpoint to DP>1 or DP=1.
        distributed = True
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed)
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        mcfg = MOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=m.params_dtype == "bf16", fp16=m.params_dtype == "fp16",
            params_dtype=model.config.params_dtype, use_distributed_optimizer=distributed)
        self.optimizer = get_megatron_optimizer(mcfg, [self.model], use_gloo_process_groups=self.device == "cuda")
        decay = o.lr_decay_steps or max(total_steps, o.warmup_steps + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            # warm-up step k (0-based) uses lr * (k + 1) / (warmup + 1): the first step is not wasted
            init_lr=o.lr / (o.warmup_steps + 1), max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(decay, o.warmup_steps + 1),
            lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant")
        cfg = model.config
        cfg.no_sync_func = self.model.no_sync
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss

    # ------------------------------------------------------------------ forward helpers

    def _micro_batches(self, batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
        # widths are multiples of pad_to_multiple, zero-padded past the batch width when wider
        return split_micro_batches(batch, self.layout.micro_batch_tokens, self.pad_to_multiple)

    def _model_forward(self, model, mb: dict) -> torch.Tensor:
        tokens = mb["tokens"].to(self._dev)
        b, t = tokens.shape
        pos = mb.get("position_ids")
        pos = pos.to(self._dev) if pos is not None else torch.arange(t, device=self._dev).expand(b, t)
        mask = None
        if self.device == "cpu":
            # megatron builds its causal mask with device="cuda" when none is given (PLATFORM.md)
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=self._dev), diagonal=1)[None, None]
        return model(tokens, pos, mask)

    @property
    def _dev(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")

    def _token_outputs(self, output: torch.Tensor, mb: dict, with_entropy: bool, temperature: float) -> dict:
        """Last-stage model output -> per-token outputs [b, t] aligned to tokens (see module doc)."""
        if self.role == "critic":
            v = output[..., 0].float()  # [b, t]: value at position t-1 belongs to token t
            return {"values": torch.nn.functional.pad(v[:, :-1], (1, 0)), "values_after": v}
        tokens = mb["tokens"].to(output.device)
        logp, ent = vocab_parallel_logprobs(output[:, :-1], tokens[:, 1:], self.model_cfg.vocab_size,
                                            self.tp_group, with_entropy, temperature)
        out = {"logprobs": torch.nn.functional.pad(logp, (1, 0))}
        if ent is not None:
            out["entropy"] = torch.nn.functional.pad(ent, (1, 0))
        return out

    def _run(self, batch: dict, loss_fn: Optional[LossFn], global_num_tokens: float, with_entropy: bool,
             forward_only: bool, temperature: float = 1.0):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        rows, mbs = self._micro_batches(batch)
        n_micro = len(mbs)
        model = self.model

        def loss_wrapper(mb, output):
            outs = self._token_outputs(output, mb, with_entropy, temperature)
            if loss_fn is None:
                return output.new_zeros(()), {k: v.detach() for k, v in outs.items()}
            loss, metrics = loss_fn(outs, {k: v.to(output.device) for k, v in mb.items()}, global_num_tokens)
            # undo megatron's 1/num_microbatches and DDP's 1/dp averaging: grad = d(sum of losses)
            scaled = loss * (n_micro * self.dp_size)
            reported = {"loss": loss.detach().float()}
            reported.update({k: torch.as_tensor(v).detach().float() for k, v in metrics.items()})
            return scaled, reported

        def forward_step(data_iterator, model_chunk):
            mb = next(data_iterator)
            return self._model_forward(model_chunk, mb), partial(loss_wrapper, mb)

        fb = get_forward_backward_func()
        store = fb(forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                   num_microbatches=n_micro, seq_length=max(m["tokens"].shape[1] for m in mbs),
                   micro_batch_size=max(m["tokens"].shape[0] for m in mbs), forward_only=forward_only)
        return rows, mbs, store

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def forward(self, batch: dict, with_entropy: bool = False, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-token outputs for every row of ``batch``, on every rank of this model replica.

        Policy: {"logprobs": [B, T]} (+ "entropy": [B, T]); critic: {"values", "values_after": [B, T]}; fp32,
        aligned to tokens (index t = token t; index 0 and positions past a row's length are 0).
        """
        self._require_onloaded("forward")
        rows, mbs, store = self._run(batch, None, 1.0, with_entropy, forward_only=True, temperature=temperature)
        b, t = batch["tokens"].shape
        keys = (["values", "values_after"] if self.role == "critic"
                else ["logprobs"] + (["entropy"] if with_entropy else []))
        out = {k: torch.zeros(b, t, dtype=torch.float32, device=self._dev) for k in keys}
        if self.is_last_stage:
            lengths = row_lengths(batch).to(self._dev)
            for r, mb, res in zip(rows, mbs, store):
                for k in keys:
                    w = min(res[k].shape[1], t)  # a padded micro-batch may be wider than the batch
                    out[k][r.to(self._dev), :w] = res[k][:, :w]
            valid = torch.arange(t, device=self._dev)[None] < lengths[:, None]
            for k in keys:
                out[k] *= valid
        if dist.get_world_size(self.pp_group) > 1:
            for k in keys:
                dist.broadcast(out[k], src=self.last_stage_rank, group=self.pp_group)
        return out

    def train_step(self, batch: dict, loss_fn: LossFn, global_num_tokens: float,
                   with_entropy: bool = False, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on ``batch`` (this DP rank's rows) with the injected ``loss_fn``.

        Returns (on every rank) the loss and loss_fn metrics summed over micro-batches and DP
        ranks, plus ``grad_norm``, ``lr``, ``num_micro_batches`` and ``skipped`` (fp16 overflow).
        """
        if self.optimizer is None:
            raise RuntimeError("engine was built with with_optimizer=False")
        self._require_onloaded("train_step")
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        rows, mbs, store = self._run(batch, loss_fn, float(global_num_tokens), with_entropy, forward_only=False,
                                     temperature=temperature)
        metrics = self._reduce_metrics(store)  # identical on every rank, so all ranks decide alike
        finite = math.isfinite(metrics.get("loss", 0.0))
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
        else:
            # a NaN/inf loss would poison the weights through the gradients: drop this update
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            ok, grad_norm = False, None
        if ok:
            self.scheduler.step(increment=1)
            self.steps += 1
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=float(self.optimizer.param_groups[0]["lr"]), num_micro_batches=float(len(mbs)),
                       skipped=float(not ok), nonfinite_loss=float(not finite))
        return metrics

    def _reduce_metrics(self, store: list[dict]) -> dict[str, float]:
        """Reduce micro-batch metrics, then over DP, then share from the last pipeline stage.

        Sums, except keys ending in ``_max`` / ``_min`` (:mod:`megatron_tppo.training.metrics`).
        """
        keys = sorted(store[0]) if self.is_last_stage and store else []
        obj = [keys]
        pp = dist.get_world_size(self.pp_group) > 1
        if pp:
            dist.broadcast_object_list(obj, src=self.last_stage_rank, group=self.pp_group)
        keys = obj[0]
        vsum, vext = pack_metrics(store if self.is_last_stage else [], keys, self._dev)
        if self.dp_size > 1:
            dist.all_reduce(vsum, group=self.dp_group)
            if vext.numel():
                dist.all_reduce(vext, op=dist.ReduceOp.MAX, group=self.dp_group)
        if pp:
            dist.broadcast(vsum, src=self.last_stage_rank, group=self.pp_group)
            if vext.numel():
                dist.broadcast(vext, src=self.last_stage_rank, group=self.pp_group)
        return unpack_metrics(keys, vsum, vext)

    # ------------------------------------------------------------------ colocation

    def offload(self, params: bool = True, grads: bool | str = True, optimizer: bool = True) -> dict:
        """Free this rank's device memory of the chosen kinds, keeping the bytes in one host buffer
        (pinned on CUDA). Local, no collective. Idempotent; call :meth:`onload` before computing again.

        ``grads``: True copies them to host; ``"drop"`` frees them without a copy and :meth:`onload`
        brings them back zero-filled, which is lossless when the next use is :meth:`train_step`
        (it zeroes the gradient buffers before its backward, and nothing else reads them); False
        leaves them on the device.

        Returns, for this call, ``bytes`` copied to host, ``dropped_bytes`` (freed, not copied),
        ``storages``, ``seconds`` and the device bytes freed per kind (``params_bytes``,
        ``grads_bytes``, ``optimizer_bytes``); ``host_bytes`` (the host buffer's size) and
        ``storage_bytes`` (the bytes it holds now); ``scratch_bytes``: megatron's scratch buffers,
        dropped. For an fp32 model the optimizer's master shards are the parameter buffer itself
        and move with ``params``.
        """
        if grads not in (True, False, "drop"):
            raise ValueError(f"grads must be True, False or 'drop', got {grads!r}")
        chosen = [k for k, on in zip(KINDS, (params, grads is True, optimizer)) if on]
        drop = ["grads"] if grads == "drop" else []
        stats = self._offloader.offload(engine_tensors(self), chosen, drop=drop)
        # stateless: dropped, not copied
        stats["scratch_bytes"] = release_scratch_buffers() if chosen or drop else 0
        if self.device == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back to the driver, for vLLM
        return stats

    def onload(self) -> dict:
        """Bring back everything :meth:`offload` moved: copied storages bit-identical, dropped
        gradients zero-filled. Returns ``bytes`` (copied back), ``zeroed_bytes``, ``storages``,
        ``seconds``, ``host_bytes``."""
        return self._offloader.onload()

    @property
    def offloaded(self) -> set[str]:
        """The kinds ("params", "grads", "optimizer") that are off the device now, copied or dropped."""
        return self._offloader.offloaded_kinds

    @property
    def dropped(self) -> set[str]:
        """The kinds offloaded without a copy (``offload(grads="drop")``): onload zero-fills them."""
        return self._offloader.dropped_kinds

    def _require_onloaded(self, what: str) -> None:
        if self.offloaded:
            raise RuntimeError(f"{what}: {sorted(self.offloaded)} offloaded; call onload() first")

    def weights_changed(self) -> None:
        """Call after writing into ``self.module``'s parameters in place (e.g. loading HF weights):
        the optimizer's main parameters (separate fp32 copies for bf16/fp16 models) follow."""
        self._require_onloaded("weights_changed")
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_dir: str, with_optimizer: bool = True) -> None:
        """Save model (+ optimizer and LR schedule) as a torch_dist checkpoint (collective)."""
        from megatron_tppo.training.checkpoint import save_checkpoint

        self._require_onloaded("save")
        save_checkpoint(self, ckpt_dir, with_optimizer)

    def load(self, ckpt_dir: str, with_optimizer: bool = True) -> None:
        """Load a torch_dist checkpoint saved at any TP/PP/DP layout (collective)."""
        from megatron_tppo.training.checkpoint import load_checkpoint

        self._require_onloaded("load")
        load_checkpoint(self, ckpt_dir, with_optimizer)

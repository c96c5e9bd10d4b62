"""Training engine on megatron-core: forward, train_step(batch, loss_fn), torch_dist checkpoints.

Importing this package imports torch only; megatron-core is imported when an engine is built or
parallel state is initialized (never vLLM or Ray).

- :func:`init_parallel` / :func:`destroy_parallel` — process groups for one layout.
- :class:`TrainEngine` — policy or critic; see its module docstring for the batch and loss contract.
- :func:`split_for_data_parallel`, :func:`data_parallel_rows`, :func:`merge_row_parts`,
  :func:`plan_micro_batches` — batch layout helpers.
- :func:`vocab_parallel_logprobs` — log-probs/entropy from TP-sharded logits.
"""
from megatron_tppo.training.batching import (
    MicroBatchPlan,
    data_parallel_rows,
    merge_row_parts,
    padding_fraction,
    plan_micro_batches,
    row_lengths,
    select_rows,
    split_for_data_parallel,
)
from megatron_tppo.training.checkpoint import copy_backbone_into, load_backbone
from megatron_tppo.training.engine import LossFn, TrainEngine
from megatron_tppo.training.parallel import ParallelInfo, destroy_parallel, init_parallel, parallel_info
from megatron_tppo.training.vocab_parallel import reference_logprobs_entropy, vocab_parallel_logprobs

__all__ = [
    "LossFn",
    "MicroBatchPlan",
    "ParallelInfo",
    "TrainEngine",
    "copy_backbone_into",
    "data_parallel_rows",
    "destroy_parallel",
    "init_parallel",
    "load_backbone",
    "merge_row_parts",
    "padding_fraction",
    "parallel_info",
    "plan_micro_batches",
    "reference_logprobs_entropy",
    "row_lengths",
    "select_rows",
    "split_for_data_parallel",
    "vocab_parallel_logprobs",
]

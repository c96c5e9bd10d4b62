"""Policy weights between megatron-core and the rollout engine.

- :mod:`~megatron_tppo.weights.hf_mapping`: pure HF <-> megatron name/layout maps (Qwen2, Llama).
- :mod:`~megatron_tppo.weights.buckets`: size-bounded streaming of mapped tensors and the sync call.

Nothing here imports vLLM, Ray or torch.distributed; gathering TP shards / PP stages into full
tensors belongs to the training engine, which hands this package an iterator of full tensors.
"""

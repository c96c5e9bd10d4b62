"""Prompt data: the synthetic arith task (arith.py), the character tokenizer (tokenizer.py) and
prompt datasets / the resumable prompt stream / the evaluation set (datasets.py).

Pure: no megatron, vllm, ray, torch.distributed or CUDA; transformers and pyarrow are imported
only inside the functions that need them.
"""

"""Pure T-PPO algorithm code: EGAE, losses, the window pool.

Nothing here imports megatron, vllm, ray, torch.distributed or touches CUDA
(tests/unit/test_import_purity.py enforces it), so all of it runs and tests anywhere.
"""

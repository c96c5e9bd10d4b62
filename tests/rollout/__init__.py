"""Rollout engine (real vLLM), HF<->megatron weight maps and bucketed weight sync."""

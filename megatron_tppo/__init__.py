"""megatron_tppo: Truncated PPO (T-PPO) for reasoning LLMs on megatron-core and vLLM."""

__version__ = "0.1.0"

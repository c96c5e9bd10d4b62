"""GPT policy and critic builders on megatron-core (megatron is imported lazily, inside the calls).

- :func:`build_gpt` — the policy (Qwen2/Llama family) for this rank's pipeline stage.
- :func:`build_critic` — the same backbone with a scalar value head.
- :func:`copy_backbone` — initialize a critic from a policy of the same layout.
- :func:`check_fp8_support` — fail early and clearly when FP8 cannot run here.
"""
from megatron_tppo.models.critic import ValueHead, build_critic, copy_backbone
from megatron_tppo.models.fp8 import FP8UnavailableError, check_fp8_support, fp8_transformer_kwargs
from megatron_tppo.models.gpt import build_gpt, derive_seed, transformer_config

__all__ = [
    "FP8UnavailableError",
    "ValueHead",
    "build_critic",
    "build_gpt",
    "check_fp8_support",
    "copy_backbone",
    "derive_seed",
    "fp8_transformer_kwargs",
    "transformer_config",
]

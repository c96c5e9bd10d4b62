"""FP8 (Transformer Engine) settings: the ModelConfig -> TransformerConfig mapping and the early check.

FP8 linear layers exist only in Transformer Engine, which needs CUDA. :func:`check_fp8_support`
is cheap (it imports nothing heavy when FP8 is off) and is meant to run in config validation or
at the top of a driver, so that asking for FP8 on a machine that cannot do it fails in a second
with a clear message instead of deep inside model construction.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional


class FP8UnavailableError(RuntimeError):
    """FP8 was requested but this machine cannot run it (no GPU or no Transformer Engine)."""


def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` imports (it needs CUDA libraries)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises various errors (OSError, ImportError) without CUDA/cuDNN
        return False
    return True


def check_fp8_support(fp8: Optional[str], device: str) -> None:
    """Raise FP8UnavailableError unless FP8 is off or (device is cuda, a GPU is visible and TE imports).

    ``fp8``: ModelConfig.fp8 (None, "e4m3" or "hybrid"). ``device``: "cpu", "cuda" or "auto".
    """
    if fp8 is None:
        return
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise FP8UnavailableError(
            f"model.fp8={fp8!r} needs a CUDA GPU with Transformer Engine, but training runs on the "
            f"CPU (device={device!r}, torch.cuda.is_available()={torch.cuda.is_available()}). "
            "Set model.fp8=null to train without FP8.")
    if not transformer_engine_available():
        raise FP8UnavailableError(
            f"model.fp8={fp8!r} needs Transformer Engine (pip install 'transformer-engine[pytorch]'), "
            "which is not importable here. Set model.fp8=null to train without FP8.")


def fp8_transformer_kwargs(fp8: Optional[str], fp8_recipe: str) -> dict[str, Any]:
    """TransformerConfig keyword arguments for ModelConfig.fp8 / fp8_recipe ({} when FP8 is off).

    Delayed scaling keeps a short amax history (Megatron-LM's recommended 1024 / "max"); the
    other recipes compute scales from the current tensor and ignore the history settings.
    """
    if fp8 is None:
        return {}
    kwargs: dict[str, Any] = {"fp8": fp8, "fp8_recipe": fp8_recipe, "fp8_margin": 0, "fp8_wgrad": True}
    if fp8_recipe == "delayed":
        kwargs.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return kwargs

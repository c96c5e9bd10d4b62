"""Metrics: TensorBoard events plus a one-line console summary per step, behind one interface.

``MetricsLogger.log(step, metrics)`` takes a flat ``{"section/name": number}`` dict (stable tag
names such as ``train/reward_mean`` or ``perf/generate_s``) and writes each as a TensorBoard
scalar; ``summary_line`` formats the few numbers a person watches. ``NullLogger`` is the no-op
used by tests and by non-zero ranks. TensorBoard is imported lazily.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping, Optional

# What the console line shows, in order: (tag, short label, format).
SUMMARY_FIELDS = (
    ("train/reward_mean", "reward", "{:.3f}"),
    ("eval/accuracy", "acc", "{:.3f}"),
    ("rollout/finished_count", "fin", "{:.0f}"),
    ("rollout/truncated_count", "trunc", "{:.0f}"),
    ("rollout/response_length_mean", "len", "{:.0f}"),
    ("policy/loss", "pl", "{:.4f}"),
    ("critic/value_loss", "vl", "{:.4f}"),
    ("perf/step_s", "s", "{:.1f}"),
)


def _scalar(value) -> Optional[float]:
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return v


def summary_line(step: int, metrics: Mapping[str, float]) -> str:
    """``step 12 | reward 0.412 | fin 37 | ...`` with only the fields present."""
    parts = [f"step {step}"]
    for tag, label, fmt in SUMMARY_FIELDS:
        if tag in metrics:
            v = _scalar(metrics[tag])
            if v is not None:
                parts.append(f"{label} {fmt.format(v)}")
    return " | ".join(parts)


class NullLogger:
    """Accepts everything, writes nothing."""

    log_dir: Optional[Path] = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger(NullLogger):
    """TensorBoard scalars under ``<output_dir>/tensorboard`` (created on construction).

    Non-finite values are still written (TensorBoard shows them) but also counted under
    ``health/nonfinite_metrics`` so a NaN never goes unnoticed.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, flush_secs: int = 10):
        self.log_dir = Path(output_dir) / "tensorboard"
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)
        self._t0 = time.time()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        nonfinite = 0
        for tag, value in metrics.items():
            v = _scalar(value)
            if v is None:
                continue
            if not math.isfinite(v):
                nonfinite += 1
            self._writer.add_scalar(tag, v, global_step=step, walltime=time.time())
        if nonfinite:
            self._writer.add_scalar("health/nonfinite_metrics", nonfinite, global_step=step)
        self._writer.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event files under ``log_dir``: ``{tag: [(step, value), ...]}`` (tests, tools)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

"""What a process holds in memory while weights move: resident set on Linux, tracked CUDA allocations.

Used by both ends of a weight transfer (the trainer ranks that send, the vLLM workers that
receive) to report how much a sync made them grow.
"""
from __future__ import annotations

import torch


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> tuple[int, int]:
    """(current, peak since the last :func:`reset_peak_rss`) resident set of this process, bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


class PeakMemory:
    """Growth of this process's memory during a ``with`` block: peak RSS above the start, and on
    CUDA the peak of tracked allocations above the start. ``.as_dict()`` after the block."""

    def __enter__(self) -> "PeakMemory":
        self.rss_reset = reset_peak_rss()
        self.rss0 = rss_bytes()[0]
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        cur, peak = rss_bytes()
        self.rss_end, self.rss_peak = cur, peak if self.rss_reset else max(cur, self.rss0)
        if self.cuda:
            self.cuda_growth = torch.cuda.max_memory_allocated() - self.cuda0

    def as_dict(self) -> dict:
        out = {"rss_start_bytes": self.rss0, "rss_peak_bytes": self.rss_peak,
               "rss_growth_bytes": self.rss_peak - self.rss0, "rss_peak_valid": self.rss_reset}
        if self.cuda:
            out["cuda_growth_bytes"] = self.cuda_growth
        return out

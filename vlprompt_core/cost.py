"""What a (method, seed) pair cost: peak memory of a stretch of work.

On CUDA the figure is PyTorch's peak allocated memory on the run's device; on
the CPU it is the peak resident set size (RSS) of this process, which Linux lets
a process reset (``/proc/self/clear_refs``), so each pair gets its own peak. Where
it cannot be reset the process's lifetime peak is reported, and said so.
Data-loader worker processes (``train.num_workers``) are not counted.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (Linux: writing 5 to clear_refs); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    """The peak RSS since the last reset (Linux ``VmHWM``), else the lifetime peak."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb`` and ``peak.kind``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_peak():
            self.kind = "rss_process_lifetime"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _rss_peak_mb()

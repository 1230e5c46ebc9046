"""Peak host (RSS) and device (CUDA) memory: of this process, of a block of code, of a run.

Three sources, each with its own meaning:

- `process_peaks()`: the kernel's high-water marks, `getrusage` `ru_maxrss` of this process and
  of its waited-for children (the largest single child, e.g. a torchrun training stage), plus
  torch's CUDA allocator peaks. Exact, but only since the process (or the last CUDA reset) began.
- `PeakMemory`: a context manager that samples this process's RSS (and its children's) from a
  background thread every `interval_s` and resets the CUDA peak on entry, so one stage of many in
  the same process gets its own peak. Sampling can miss a spike shorter than the interval; the
  CUDA figure cannot (the allocator counts it).
- Stage manifests carry a `memory` dict when the process that ran the stage recorded one
  (`PeakMemory.result()` is what to put there); the report shows it when present.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from typing import Any

import psutil
import torch

__all__ = ["PeakMemory", "cuda_peaks", "process_peaks", "rss_bytes"]


def _maxrss_bytes(who: int) -> int:
    value = resource.getrusage(who).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)  # Linux reports KiB


def rss_bytes(include_children: bool = False) -> int:
    """Resident set size now (optionally plus the live children's)."""
    proc = psutil.Process()
    total = proc.memory_info().rss
    if include_children:
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
    return int(total)


def cuda_peaks() -> dict[str, int] | None:
    """Allocator peaks on the current CUDA device since the last reset; None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {"peak_cuda_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_cuda_reserved_bytes": int(torch.cuda.max_memory_reserved()),
            "cuda_device": torch.cuda.get_device_name()}


def process_peaks() -> dict[str, Any]:
    """High-water marks of this process since it started (and of its largest finished child)."""
    out: dict[str, Any] = {"peak_rss_bytes": _maxrss_bytes(resource.RUSAGE_SELF),
                           "peak_rss_children_bytes": _maxrss_bytes(resource.RUSAGE_CHILDREN)}
    out.update(cuda_peaks() or {})
    return out


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.result()`: peak RSS and CUDA memory inside the block.

    RSS is sampled (this process + live children) every `interval_s`; the process's own
    `ru_maxrss` is also read at exit, and when it rose during the block it is the exact peak
    (it can only be used when it rose: otherwise the peak was before the block).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self.wall_time_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_before = 0
        self._cuda: dict[str, int] | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes(include_children=True))
            except psutil.Error:
                pass

    def __enter__(self) -> PeakMemory:
        self._maxrss_before = _maxrss_bytes(resource.RUSAGE_SELF)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss_bytes = rss_bytes(include_children=True)
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall_time_s = time.perf_counter() - self._started
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes(include_children=True))
        maxrss = _maxrss_bytes(resource.RUSAGE_SELF)
        if maxrss > self._maxrss_before:
            self.peak_rss_bytes = max(self.peak_rss_bytes, maxrss)
        self._cuda = cuda_peaks()

    def result(self) -> dict[str, Any]:
        """What a stage manifest's `memory` field holds."""
        return {"peak_rss_bytes": int(self.peak_rss_bytes), "rss_sample_interval_s": self.interval_s,
                "wall_time_s": round(self.wall_time_s, 3), **(self._cuda or {})}

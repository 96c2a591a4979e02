"""Memory: a process's peak (CUDA's allocator on a GPU, the process's peak resident set on a
CPU) and the machine's total memory, measured one way for the cells (``harness.train.run``),
the speed benchmark (``harness.bench.speed``) and the grid's ``n_jobs=auto``.

On a CPU the peak is Linux's ``VmHWM`` (``/proc/self/status``), which writing ``5`` to
``/proc/self/clear_refs`` resets to the current resident set; where that cannot be read or
reset (not Linux, not permitted) it is ``getrusage``'s ``ru_maxrss``, the process's peak since
its start.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

PEAK_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats",
    "vmhwm": "peak RSS (VmHWM, reset via /proc/self/clear_refs)",
    "ru_maxrss": "peak RSS (getrusage ru_maxrss; not resettable here)",
}


def proc_status_kb(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss_mb() -> float:
    """``ru_maxrss`` in MB: KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_memory(device_type: str) -> str:
    """Start measuring a peak from now on ``device_type`` ("cuda" or "cpu"): CUDA's allocator
    peak, or the process's peak resident set. Returns how the peak is measured (``PEAK_METHODS``)."""
    if device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return PEAK_METHODS["cuda"]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM back to the current RSS
        return PEAK_METHODS["vmhwm"]
    except OSError:  # not Linux, or not permitted: the process's peak since its start is what we get
        return PEAK_METHODS["ru_maxrss"]


def peak_memory_mb(device_type: str) -> float:
    """The peak since ``reset_peak_memory`` in MB: CUDA's max allocated, or the process's peak
    resident set (VmHWM, else ru_maxrss)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    peak_kb = proc_status_kb("VmHWM")
    return peak_kb / 1024 if peak_kb else _max_rss_mb()


def current_memory_mb(device_type: str) -> float:
    """Memory in use now in MB: CUDA's allocated, or the process's resident set (0 where
    ``/proc`` cannot say): the baseline a peak is measured above."""
    if device_type == "cuda":
        import torch

        return torch.cuda.memory_allocated() / 2**20
    return (proc_status_kb("VmRSS") or 0.0) / 1024


def total_memory_mb() -> float:
    """The machine's physical memory in MB (``sysconf``), 0 where the system cannot say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):  # a name this system lacks; Windows has no sysconf
        return 0.0

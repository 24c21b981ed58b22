"""Memory figures of this process for the stage manifests, without importing torch: the controller
seals stages and plans iterations without it (a torch import costs ~10 s of CPU at start-up)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def peak_gpu_gib() -> float:
    """Peak GPU memory allocated by this process since the last reset_peaks() (0 on the CPU, or where
    torch never loaded)."""
    torch = sys.modules.get("torch")  # a process that never imported torch allocated nothing on a GPU
    return torch.cuda.max_memory_allocated() / 2**30 if torch is not None and torch.cuda.is_available() else 0.0


def reset_peaks() -> None:
    """Start this process's peak figures afresh, so that a resident worker's next task reports its own
    peak, not the largest of every role it held so far: the GPU allocator's peak, and the kernel's
    resident-memory high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last reset_peaks() (a stage process: its
    stage's; a resident worker: its current task's). The kernel's high-water mark of this process
    image (VmHWM): ru_maxrss would also count the parent's memory at the fork that started us."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def rss_gib() -> float:
    """Resident memory of this process now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

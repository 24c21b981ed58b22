"""Memory figures of this process for the stage manifests, without importing torch: the controller
seals stages and plans iterations without it (a torch import costs ~10 s of CPU at start-up)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def peak_gpu_gib() -> float:
    """Peak GPU memory allocated by this process so far (0 on the CPU, or where torch never loaded)."""
    torch = sys.modules.get("torch")  # a process that never imported torch allocated nothing on a GPU
    return torch.cuda.max_memory_allocated() / 2**30 if torch is not None and torch.cuda.is_available() else 0.0


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (a stage process: its stage's; a resident worker:
    the largest of all its roles so far). The kernel's high-water mark of this process image (VmHWM):
    ru_maxrss would also count the parent's memory at the fork that started us."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20


def rss_gib() -> float:
    """Resident memory of this process now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

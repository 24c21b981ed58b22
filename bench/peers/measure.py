"""Running one measured process: wall and CPU time, peak memory, the machine's load."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    print(f"[bench-peers {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (0 if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


class RunFailed(RuntimeError):
    """A measured process exited non-zero: `reason` is its log's last line (usually the exception)."""

    def __init__(self, message: str, reason: str, log: Path):
        super().__init__(message)
        self.reason, self.log = reason, log


def run_measured(command: list[str], log: Path, time_cap_s: float, env: dict | None = None,
                 launch: float | None = None) -> dict:
    """Run `command` (output to `log`) under a wall-time cap: wall and CPU time, peak RSS, machine load."""
    launch = launch or time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    peak_tree, loads, stop = [0], [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(proc.pid))
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    capped = threading.Timer(time_cap_s, lambda: os.killpg(proc.pid, signal.SIGTERM))
    capped.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the whole tree's CPU time; ru_maxrss: its largest process (KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    capped.cancel()
    stop.set()
    sampler.join()
    wall = time.time() - launch
    hit_cap = wall >= time_cap_s - 1
    if proc.returncode != 0 and not hit_cap:
        lines = log.read_text().splitlines()
        reason = next((line.removeprefix("[rank0]: ").strip() for line in reversed(lines) if line.strip()), "")
        raise RunFailed(f"error: {' '.join(command[:4])} ... failed with exit code {proc.returncode} (log: {log}):\n"
                        + "\n".join(lines[-20:]), reason, log)
    return {"launch": launch, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "time_capped": hit_cap,
            "peak_rss_largest_process_mib": usage.ru_maxrss / 1024, "peak_rss_tree_mib": peak_tree[0] / 2**20,
            "load_mean": sum(loads) / len(loads) if loads else os.getloadavg()[0]}

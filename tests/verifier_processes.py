"""The verifier pool's worker processes, as the operating system sees them (the pool keeps no record).

pebble starts them through multiprocessing's forkserver, so they are the forkserver's children; in a
process forked from one whose pool ran, the pool spawns them instead, as its own children.
"""
from __future__ import annotations

import psutil


def worker_pids() -> list[int]:
    """Process ids of the live verifier workers of this process, oldest first."""
    children = psutil.Process().children()
    servers = [child for child in children if _is(child, "forkserver")]
    found = ([worker for server in servers for worker in _children(server)] if servers
             else [child for child in children if _is(child, "--multiprocessing-fork")])
    live = []
    for process in found:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:  # dead; its parent has not reaped it yet
                live.append((process.create_time(), process.pid))
        except psutil.NoSuchProcess:
            pass
    return [pid for _, pid in sorted(live)]


def _is(process: psutil.Process, marker: str) -> bool:
    try:
        return marker in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children()
    except psutil.Error:
        return []

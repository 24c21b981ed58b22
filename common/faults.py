"""Crash injection for the reliability tests (tests/test_faults.py, `make faults`).

`OPD_FAULT=<point>[:<n>]` makes a process kill itself with SIGKILL the n-th time (default 1st) it
reaches `fault_point("<point>")`: no exception handler, `finally` or atexit runs, exactly like a
kill -9 or a lost machine. The points sit where a crash hurts most: between writing a file and
renaming it into place, between an optimizer step and the next, between logging metrics and
recording that they were logged, and (`rendered`) in the controller while the process that rendered
the prompt sets waits to be shut down. Unset (always, outside tests), a point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = ("shard", "manifest", "checkpoint", "state", "train_step", "mlflow", "rendered")
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("OPD_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

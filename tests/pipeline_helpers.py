"""Helpers shared by the end-to-end tests and the fault-injection campaign (`make faults`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Two tiny iterations in about a minute on 2 cores: 8 prompts x 2 responses, 2 optimizer steps.
OVERRIDES = ["generate.prompts_per_iteration=8", "generate.n=2", "train.mini_batch_prompts=4",
             "train.micro_batch_size=8", "eval.every=1", "eval.prompts=16", "train.lr=1e-4"]


def orchestrate(run: Path, iterations: int, *extra: str, fault: str | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m orchestrator iterate` on the tiny config; `fault` sets OPD_FAULT (common/faults.py)."""
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config", "configs/tiny.yaml",
               "-n", str(iterations), *[a for o in OVERRIDES for a in ("-o", o)], *extra]
    env = {k: v for k, v in os.environ.items() if k != "OPD_FAULT"}
    if fault:
        env["OPD_FAULT"] = fault
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)

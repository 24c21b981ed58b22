"""One JSON file per benchmark in bench/results/, the input of the summary table (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} x {model}, {memory_gib:.0f} GiB"


def write_results(name: str, command: str, rows: list[dict]) -> Path:
    """rows: {"metric", "value", "unit", "goal" ('' when none), "met" (bool, or None when no goal)}."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "command": command, "date": time.strftime("%Y-%m-%d"),
                                "machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
    return path

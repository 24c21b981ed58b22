"""One JSON file per benchmark in bench/results/, the input of the summary table (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """'2 x AMD EPYC (AVX-512), 24 GiB'. The vector extension is named because machines reporting the
    same CPU name here have had AVX2 only or AVX-512, which moves every CPU figure ~2x."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    vector = " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} x {model}{vector}, {memory_gib:.0f} GiB"


def write_results(name: str, command: str, rows: list[dict], extra: dict | None = None) -> Path:
    """rows: {"metric", "value", "unit", "goal" ('' when none), "met" (bool, or None when no goal)};
    `extra`: top-level fields of this benchmark (e.g. the seeds it ran)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "command": command, "date": time.strftime("%Y-%m-%d"),
                                "machine": machine(), **(extra or {}), "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
    return path

"""One evaluator for every model of the benchmark: the loop's own (tiny_world.evaluate.accuracy)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.peers.measure import ROOT, say

EVAL_SET = ROOT / "assets" / "tiny" / "data" / "eval.parquet"


def evaluate_main(paths: list[str], out: Path) -> None:
    """Accuracy of each model folder, written to `out` as they come (a child process of `evaluate`)."""
    from common.run import quiet_libraries
    from tiny_world.evaluate import accuracy

    quiet_libraries()
    results = {}
    for path in paths:
        began = time.perf_counter()
        results[path] = accuracy(Path(path), EVAL_SET, temperature=1.0, seed=0, max_new_tokens=64)["accuracy"]
        say(f"eval {path}: {results[path]:.3f} ({time.perf_counter() - began:.1f}s)")
        out.write_text(json.dumps(results, indent=1))


def evaluate(paths: list[str], work: Path) -> dict[str, float]:
    """Accuracies of `paths` (in a child process), merged into <work>/eval.json; returns all of them."""
    out, batch = work / "eval.json", work / "eval-batch.json"
    subprocess.run([sys.executable, "-m", "bench.peers", "evaluate", "--out", str(batch), *paths], cwd=ROOT,
                   check=True)
    accuracies = {**(json.loads(out.read_text()) if out.exists() else {}), **json.loads(batch.read_text())}
    out.write_text(json.dumps(accuracies, indent=1))
    return accuracies


def apply_accuracies(runs: list[dict], accuracies: dict[str, float]) -> None:
    for run in runs:
        for checkpoint in run.get("checkpoints", []):  # none: a peer that failed
            if checkpoint["path"] in accuracies:
                checkpoint["accuracy"] = accuracies[checkpoint["path"]]

"""One evaluator for every model of the benchmark: the loop's own (tiny_world.evaluate.accuracy), on
the tiny eval split or a larger set drawn from the same generator."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bench.peers.measure import ROOT, say

EVAL_SET = ROOT / "assets" / "tiny" / "data" / "eval.parquet"


def eval_set(work: Path, prompts: int) -> Path:
    """The tiny eval split (500 prompts), or a larger set: that split and then the next pairs of the
    generator that drew it (tiny_world/task.py: make_pairs draws the eval pairs, then the train pairs,
    never one twice), so every extra prompt is disjoint from both. Written into the work folder."""
    from tiny_world.build import BuildConfig

    shape = BuildConfig()
    if prompts <= shape.n_eval:
        return EVAL_SET
    import pyarrow.parquet as pq

    from tiny_world.task import make_pairs, to_table

    train, split = make_pairs(shape.seed, shape.n_train + prompts - shape.n_eval, shape.n_eval, shape.max_digits)
    shipped = pq.read_table(ROOT / "assets" / "tiny" / "data" / "train.parquet", columns=["reward_model"])
    if len(train) - (prompts - shape.n_eval) != shipped.num_rows:
        raise SystemExit("error: the tiny world's generator no longer draws assets/tiny's train split (fix: make "
                         "tiny-assets, or evaluate on the 500 prompts of its eval split)")
    path = work / f"eval-{prompts}.parquet"
    pq.write_table(to_table(split + train[shape.n_train:], "eval"), path)
    return path


def standard_error(accuracy: float, prompts: int) -> float:
    """Of an accuracy measured with one sample on each of `prompts` independent prompts."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / prompts)


def evaluate_main(paths: list[str], out: Path, eval_path: Path = EVAL_SET) -> None:
    """Accuracy of each model folder, written to `out` as they come (a child process of `evaluate`)."""
    from common.libraries import quiet_libraries
    from tiny_world.evaluate import accuracy

    quiet_libraries()
    results = {}
    for path in paths:
        began = time.perf_counter()
        results[path] = accuracy(Path(path), eval_path, temperature=1.0, seed=0, max_new_tokens=64)["accuracy"]
        say(f"eval {path}: {results[path]:.3f} ({time.perf_counter() - began:.1f}s)")
        out.write_text(json.dumps(results, indent=1))


def evaluate(paths: list[str], work: Path, eval_path: Path = EVAL_SET) -> dict[str, float]:
    """Accuracies of `paths` (in a child process), merged into <work>/eval.json; returns all of them."""
    out, batch = work / "eval.json", work / "eval-batch.json"
    subprocess.run([sys.executable, "-m", "bench.peers", "evaluate", "--out", str(batch), "--set", str(eval_path),
                    *paths], cwd=ROOT, check=True)
    accuracies = {**(json.loads(out.read_text()) if out.exists() else {}), **json.loads(batch.read_text())}
    out.write_text(json.dumps(accuracies, indent=1))
    return accuracies


def apply_accuracies(runs: list[dict], accuracies: dict[str, float]) -> None:
    for run in runs:
        for checkpoint in run.get("checkpoints", []):  # none: a peer that failed
            if checkpoint["path"] in accuracies:
                checkpoint["accuracy"] = accuracies[checkpoint["path"]]

"""`make compare RUNS=a,b[,c]`: the runs' key params and final metrics side by side.

Everything comes from MLflow's search API (the same store `make mlflow-ui` shows), so the table
and the UI's compare view agree. Params that differ between the runs are listed too, highlighted.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from common.errors import UserError
from orchestrator.runs import mlflow_run, require_run

KEY_PARAMS = ["model.student", "model.teacher", "train.loss", "train.lr", "train.warmup_steps",
              "generate.prompts_per_iteration", "generate.n", "train.mini_batch_prompts", "seed"]
# (metric, label); final = the last value logged, which for eval is the last checkpoint's.
FINAL_METRICS = [
    ("eval.accuracy", "eval accuracy (last checkpoint)"),
    ("eval.teacher_accuracy", "teacher eval accuracy"),
    ("rollout.accuracy", "rollout accuracy (last iteration)"),
    ("rollout.reward_mean", "rollout reward"),
    ("rollout.reverse_kl", "mean reverse KL"),
    ("generate.mean_response_length", "response length"),
    ("train.loss", "train loss"),
    ("train.grad_norm", "grad norm"),
]


def resolve_runs(names: str, root: Path) -> list[Path]:
    runs = [root / name.strip() for name in names.split(",") if name.strip()]
    if len(runs) < 2:
        raise UserError(f"RUNS={names!r} names {len(runs)} run", "give two or more, e.g. RUNS=tiny,lr-test")
    for run in runs:
        require_run(run, what="each name in RUNS")
        if runs.count(run) > 1:
            raise UserError(f"RUNS names {run.name} twice", "name each run once")
    return runs


def search(runs: list[Path]) -> dict[Path, object]:
    """The MLflow run of each folder, fetched with one search_runs call per tracking store."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    by_store: dict[str, dict[str, Path]] = defaultdict(dict)
    for run in runs:
        uri, run_id = mlflow_run(run)
        by_store[uri][run_id] = run
    found = {}
    for uri, ids in by_store.items():
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        quoted = ", ".join(f"'{i}'" for i in ids)
        for result in client.search_runs(experiments, filter_string=f"attributes.run_id IN ({quoted})"):
            found[ids[result.info.run_id]] = result
    for run in runs:
        if run not in found:
            raise UserError(f"{run} names an MLflow run that is not in its tracking store",
                            f"rerun `make iterate RUN={run.name}` to start a new MLflow run")
    return found


def comparison_table(runs: list[Path], found: dict) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title="runs compared (MLflow)", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run.name, justify="right")
    params = {run: found[run].data.params for run in runs}
    differing = sorted(k for k in set().union(*params.values())
                       if len({params[r].get(k) for r in runs}) > 1 and k not in KEY_PARAMS)
    for key in KEY_PARAMS + differing:
        values = [params[r].get(key, "-") for r in runs]
        style = "bold yellow" if len(set(values)) > 1 else None
        table.add_row(key, *values, style=style)
    table.add_section()
    table.add_row("iterations", *[str(len(list(Path(r).glob("iter=*/train/_MANIFEST.json")))) for r in runs])
    for metric, label in FINAL_METRICS:
        values = [found[r].data.metrics.get(metric) for r in runs]
        if all(v is None for v in values):
            continue
        table.add_row(label, *["-" if v is None else f"{v:.4g}" for v in values])
    table.add_row("MLflow run id", *[found[r].info.run_id[:12] for r in runs])
    return table


def compare(names: str, root: Path = Path("runs")) -> None:
    runs = resolve_runs(names, Path(root))
    found = search(runs)
    # A wide fixed width when piped, so the table is not wrapped at 80 columns in logs.
    console = Console(highlight=False, markup=False, width=None if Console().is_terminal else 160)
    console.print(comparison_table(runs, found))

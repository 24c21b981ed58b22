"""Finding run folders and their MLflow runs, with errors a person can act on.

Every user-facing command (report, compare, inspect) goes through here, so a wrong RUN, ITER or
RUNS prints one line, `error: <what> (fix: <how>)`, instead of a traceback.
"""
from __future__ import annotations

from pathlib import Path

from common import shards
from common.errors import UserError
from common.run import RUN_CONFIG, load_run_config
from orchestrator.tracking import RUN_ID_FILE, tracking_uri


def run_names(root: Path) -> list[str]:
    """Names of the run folders under `root` (those holding a frozen run.yaml)."""
    return sorted(p.parent.name for p in Path(root).glob(f"*/{RUN_CONFIG}"))


def require_run(run: Path, what: str = "RUN") -> Path:
    run = Path(run)
    if not (run / RUN_CONFIG).exists():
        known = run_names(run.parent)
        fix = (f"{what} must be one of: {', '.join(known)}" if known
               else f"start it first with `make iterate RUN={run.name}`")
        raise UserError(f"no run folder {run}", fix)
    return run


def scored_iterations(run: Path) -> list[int]:
    return sorted(int(p.parent.parent.name.split("=")[1])
                  for p in Path(run).glob(f"iter=*/scored/{shards.MANIFEST}"))


def require_iteration(run: Path, iteration: int | None) -> int:
    """The given iteration if it has scored shards, else the latest one when none was given."""
    done = scored_iterations(run)
    if not done:
        raise UserError(f"{run} has no scored iteration yet", f"let `make iterate RUN={Path(run).name}` finish one")
    if iteration is None:
        return done[-1]
    if iteration not in done:
        raise UserError(f"iteration {iteration} of {run} has no scored shards",
                        f"ITER must be one of {done[0]}..{done[-1]}")
    return iteration


def mlflow_run(run: Path) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of a run folder."""
    id_file = Path(run) / RUN_ID_FILE
    if not id_file.exists():
        raise UserError(f"{run} has no MLflow run yet", f"run `make iterate RUN={Path(run).name}` first")
    return tracking_uri(load_run_config(run), run), id_file.read_text().strip()

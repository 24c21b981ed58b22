"""MLflow logging, from the orchestrator only (sqlite locks under many writers).

One MLflow run per pipeline run; its id lives in the run folder so a resumed run keeps logging to
it. Each stage's metrics are logged once per iteration: a `_LOGGED` marker beside the manifest
records that they went out, and a crash before the marker is caught by looking the points up.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import Config
from common.faults import fault_point

RUN_ID_FILE = "mlflow_run_id"
LOGGED = "_LOGGED"


def tracking_uri(config: Config, run: Path) -> str:
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    return f"sqlite:///{Path(run).resolve().parent / 'mlflow.db'}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    def __init__(self, config: Config, run: Path):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        # Its sqlite store logs "Creating initial tables" / "Updating database tables" at INFO on start
        # (mlflow sets its loggers' levels on import: quieten them after it).
        logging.getLogger("mlflow").setLevel(logging.WARNING)

        self.mlflow = mlflow
        self.run = Path(run)
        mlflow.set_tracking_uri(tracking_uri(config, run))
        if mlflow.get_experiment_by_name(config.mlflow.experiment) is None:
            # Artifacts beside the database, inside runs/, not in the current directory.
            artifacts = (self.run.resolve().parent / "mlartifacts").as_uri()
            mlflow.create_experiment(config.mlflow.experiment, artifact_location=artifacts)
        experiment = mlflow.set_experiment(config.mlflow.experiment)
        id_file = self.run / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        known = run_id is not None and mlflow.MlflowClient().search_runs(
            [experiment.experiment_id], filter_string=f"attributes.run_id = '{run_id}'")
        if known:
            self.active = mlflow.start_run(run_id=run_id)
        else:  # a new run, or a run folder moved away from its tracking store
            self.active = mlflow.start_run(run_name=self.run.name)
            id_file.write_text(self.active.info.run_id + "\n")
            mlflow.log_params(_flatten(config.to_dict()))

    def log_stage(self, stage_dir: Path, metrics: dict, step: int) -> None:
        marker = Path(stage_dir) / LOGGED
        if marker.exists():
            return
        # MLflow's names take no '@': the manifests' eval/<set>/pass@<k> is eval.<set>.pass_at_<k> there.
        numeric = {k.replace("/", ".").replace("@", "_at_"): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float))}
        # A crash between logging and the marker must not log the points twice: the batch is one
        # sqlite transaction, so one of its metrics at this step tells whether it went out.
        probe = next(iter(numeric), None)
        history = self.mlflow.MlflowClient().get_metric_history(self.active.info.run_id, probe) if probe else []
        if not any(point.step == step for point in history):
            self.mlflow.log_metrics(numeric, step=step)
        fault_point("mlflow")
        marker.write_text("")

    def close(self) -> None:
        self.mlflow.end_run()

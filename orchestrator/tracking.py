"""MLflow logging, from the orchestrator only (sqlite locks under many writers).

One MLflow run per pipeline run; its id lives in the run folder so a resumed run keeps logging to
it. Each stage's metrics are logged once per iteration: a `_LOGGED` marker beside the manifest
records that they went out, and a crash before the marker is caught by looking the points up.
The logging itself runs on a thread of its own, in order, so the next iteration never waits for
sqlite; `close()` (the end of a `with Tracker(...)` block) waits for it, and an error there comes back
at the next call or at close, never in place of an error already on its way.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
        self.uri = tracking_uri(config, run)
        mlflow.set_tracking_uri(self.uri)
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
        self.logging = ThreadPoolExecutor(1, thread_name_prefix="mlflow")
        self.pending: list[Future] = []

    def log_stage(self, stage_dir: Path, metrics: dict, step: int) -> None:
        """Queue one stage's metrics for MLflow (raises what an earlier one raised)."""
        self._raise_failures(wait=False)
        self.pending.append(self.logging.submit(self._log_stage, Path(stage_dir), dict(metrics), step))

    def _raise_failures(self, wait: bool) -> None:
        done = [future for future in self.pending if wait or future.done()]
        self.pending = [future for future in self.pending if future not in done]
        for future in done:
            future.result()

    def _log_stage(self, stage_dir: Path, metrics: dict, step: int) -> None:
        marker = stage_dir / LOGGED
        if marker.exists():
            return
        # MLflow's names take no '@': the manifests' eval/<set>/pass@<k> is eval.<set>.pass_at_<k> there.
        numeric = {k.replace("/", ".").replace("@", "_at_"): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float))}
        # A crash between logging and the marker must not log the points twice: the batch is one
        # sqlite transaction, so one of its metrics at this step tells whether it went out.
        probe = next(iter(numeric), None)
        client, run_id = self.mlflow.MlflowClient(self.uri), self.active.info.run_id
        history = client.get_metric_history(run_id, probe) if probe else []
        if not any(point.step == step for point in history):
            from mlflow.entities import Metric

            # By run id: mlflow's active run is per thread, and this is not the thread that started it.
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in numeric.items()])
        fault_point("mlflow")
        marker.write_text("")

    def close(self, quiet: bool = False) -> None:
        """Wait for the queued logging, then end the MLflow run. An error of the logging is raised, or with
        `quiet` (another error is on its way) printed as a warning line, so it never hides that one."""
        try:
            self._raise_failures(wait=True)
        except Exception as error:
            if not quiet:
                raise
            print(f"warning: MLflow logging failed too ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
        finally:
            self.logging.shutdown()
            self.mlflow.end_run()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(quiet=error is not None)

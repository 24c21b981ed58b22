"""MLflow logging from the controller: on a thread of its own, into the run's own MLflow run, once per stage."""
from pathlib import Path

import mlflow
import pytest

from common.config import load_config
from common.errors import StageFailed
from orchestrator.tracking import LOGGED, RUN_ID_FILE, Tracker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_a_stage_is_logged_once_into_the_runs_own_mlflow_run(tmp_path):
    """Logged from the tracker's thread (mlflow's active run is per thread): the points land in the run
    this tracker started, at the iteration's step; a stage logged again (its marker is there) is not."""
    run = tmp_path / "run"
    stage = run / "iter=0003" / "rollouts"
    stage.mkdir(parents=True)
    tracker = Tracker(load_config(CONFIG), run)
    tracker.log_stage(stage, {"generate/tokens_per_s": 1.5, "eval/tiny/pass@4": 0.25, "engine": "hf"}, 3)
    tracker.log_stage(stage, {"generate/tokens_per_s": 9.0}, 3)
    tracker.close()
    assert (stage / LOGGED).exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run / RUN_ID_FILE).read_text().strip()
    experiment = client.get_experiment_by_name(load_config(CONFIG).mlflow.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "generate.tokens_per_s")] == [(3, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval.tiny.pass_at_4")] == [(3, 0.25)]
    assert "engine" not in client.get_run(run_id).data.metrics


def test_a_failure_on_the_logging_thread_is_raised_by_close(tmp_path):
    """The loop never waits for the logging, so an error there must come back to it: at close (or the next
    call), not lost on the thread. Here the stage folder is gone by the time the marker is written."""
    run = tmp_path / "run"
    run.mkdir()
    tracker = Tracker(load_config(CONFIG), run)
    tracker.log_stage(run / "iter=0000" / "missing", {"train/loss": 1.0}, 0)
    with pytest.raises(FileNotFoundError):
        tracker.close()


def test_a_logging_failure_never_hides_the_error_already_on_its_way(tmp_path, capsys):
    """A stage failed, and the logging failed too: the stage's one-line error is what the user gets; the
    logging's is a warning line beside it (control: the same logging failure alone is raised, above)."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(StageFailed, match="stage train failed"):
        with Tracker(load_config(CONFIG), run) as tracker:
            tracker.log_stage(run / "iter=0000" / "missing", {"train/loss": 1.0}, 0)
            raise StageFailed("stage train failed at iteration 0: a worker died")
    assert "warning: MLflow logging failed too (FileNotFoundError" in capsys.readouterr().err

"""End to end on the tiny world: two iterations through real stage processes, DeepSpeed and MLflow."""
import shutil
import subprocess
import sys

import polars as pl
import pytest
from pipeline_helpers import orchestrate

from common import shards
from common.config import load_config
from common.shards import policy_version


@pytest.fixture(scope="module")
def run(reference_run):
    return reference_run


def test_shards_rows_and_versions(run):
    for iteration in range(2):
        version = policy_version(shards.checkpoint_dir(run, iteration))
        scored = pl.read_parquet(shards.stage_dir(run, iteration, "scored") / "*.parquet")
        assert scored.height == 8 * 2
        assert scored.select(pl.struct("prompt_id", "sample_idx").n_unique()).item() == 16
        assert scored["policy_version"].unique().to_list() == [version]
        assert (scored["response_ids"].list.len() == scored["teacher_logprobs"].list.len()).all()
        assert (scored["response_ids"].list.len() == scored["rollout_logprobs"].list.len()).all()
        train = shards.read_manifest(shards.stage_dir(run, iteration, "train"))
        assert train.policy_version == version
        assert train.produced_version == policy_version(shards.checkpoint_dir(run, iteration + 1))
    assert shards.checkpoint_ready(shards.checkpoint_dir(run, 2))
    assert policy_version(shards.checkpoint_dir(run, 2)) != policy_version(shards.checkpoint_dir(run, 1))


def test_mlflow_has_one_point_per_iteration(run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run.parent / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient()
    for metric in ("rollout.reverse_kl", "rollout.reward_mean", "train.loss", "train.grad_norm",
                   "train.clip_fraction", "generate.mean_response_length", "time.train_stage_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert steps == [0, 1], metric
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval.accuracy")) == [0, 1, 2]
    assert client.get_run(run_id).data.params["train.loss"] == "k1"


def test_trainer_refuses_a_stale_shard(run, tmp_path):
    stale_run = tmp_path / "stale"
    shutil.copytree(run, stale_run)
    # Iteration 1 must train v0001; hand it iteration 0's rows (sampled by v0000).
    shutil.rmtree(shards.stage_dir(stale_run, 1, "scored"))
    shutil.rmtree(shards.stage_dir(stale_run, 1, "train"))
    shutil.copytree(shards.stage_dir(stale_run, 0, "scored"), shards.stage_dir(stale_run, 1, "scored"))
    result = subprocess.run([sys.executable, "-m", "stages.train", "--run", str(stale_run), "--iter", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "refusing to train" in result.stderr and "v0000" in result.stderr


def test_changed_config_is_refused_unless_forced(run, tmp_path):
    result = orchestrate(run, 0, "-o", "train.lr=5e-4")
    assert result.returncode == 2 and "train.lr" in result.stderr
    assert load_config(run / "run.yaml").train.lr == 1e-4
    forced = tmp_path / "forced"  # a copy: the other tests read the module's run as it is
    shutil.copytree(run, forced)
    result = orchestrate(forced, 0, "-o", "train.lr=5e-4", "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_config(forced / "run.yaml").train.lr == 5e-4  # continued, and frozen under the new config
    assert orchestrate(forced, 0, "-o", "train.lr=5e-4").returncode == 0  # which now needs no force


@pytest.mark.slow  # the default suite's kill -9 and corruption tests resume the same way
def test_interrupted_iteration_resumes_at_the_missing_stage(run, tmp_path):
    """Lose the end of iteration 1 (train manifest and checkpoint v0002): the next call redoes only
    the train stage, and, being deterministic, produces the very same v0002."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    before = policy_version(shards.checkpoint_dir(run, 2))
    rollouts_sha = shards.read_manifest(shards.stage_dir(run, 1, "rollouts")).files[0].sha256
    shutil.rmtree(shards.checkpoint_dir(resumed, 2))
    (shards.stage_dir(resumed, 1, "train") / shards.MANIFEST).unlink()
    result = orchestrate(resumed, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 iteration(s) done" in result.stdout
    assert "generate iter 1" not in result.stdout and "train iter 1" in result.stdout
    assert shards.read_manifest(shards.stage_dir(resumed, 1, "rollouts")).files[0].sha256 == rollouts_sha
    assert policy_version(shards.checkpoint_dir(resumed, 2)) == before

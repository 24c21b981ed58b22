"""Resident mode: one controller, workers that keep every model loaded (generation engine, teacher,
DeepSpeed trainer), the same bytes as stage processes; and the weight-sync gate that an engine
must pass after loading a policy, before it samples anything."""
import json
import shutil
import subprocess
import sys

import pytest
from pipeline_helpers import assert_same_as_reference, orchestrate

from common import shards
from common.errors import WeightSyncError
from common.modeling import load_weights_in_place
from stages.generate.gate import check_weight_sync
from stages.generate.hf_engine import HfEngine


def manifest(run, iteration, stage):
    return shards.read_manifest(shards.stage_dir(run, iteration, stage))


def test_resident_run_on_two_workers_equals_the_subprocess_run(reference_run, tmp_path):
    """Two workers share the generate and score shards, one keeps the trainer: every rollout, scored
    and eval shard is byte-identical to the stage processes' run, and so is every checkpoint.
    Iteration 1 samples from v0001 loaded in place and trains on the engine that wrote v0001; the
    trainer opened v0000 while the controller started, so iteration 0 finds it open too. The
    controller plans and seals all of it without importing a model library (its start-up stays light)."""
    run = tmp_path / "resident"
    result = orchestrate(run, 2, "-o", "orchestrator.mode=resident", "-o", "cluster.workers=2", imports=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "imported: []"
    assert_same_as_reference(run, reference_run)
    assert manifest(run, 0, "rollouts").metrics["generate/workers"] == 2
    assert manifest(run, 0, "scored").metrics["score/workers"] == 2
    assert [manifest(run, i, "train").metrics["train/resident_engine"] for i in (0, 1)] == [1.0, 1.0]
    assert [manifest(reference_run, i, "train").metrics["train/resident_engine"] for i in (0, 1)] == [0.0, 0.0]
    assert manifest(run, 1, "rollouts").metrics["generate/weight_sync_gap_mean"] < 1e-5


def test_the_controllers_modules_import_no_model_library():
    """What a driver imports to plan, run and seal the stages (the loop, both executors, the stage
    commands) loads neither torch nor transformers at run time (import-linter checks it statically in
    `make test`); the workers' task modules do (the negative control)."""
    controller = ("orchestrator.loop", "orchestrator.cluster", "orchestrator.dask_executor", "orchestrator.roles",
                  "orchestrator.tracking", "stages.generate.__main__", "stages.score.__main__",
                  "stages.train.__main__", "common.errors")
    check = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; print('torch' in sys.modules)"
    ran = [subprocess.run([sys.executable, "-c", check, *modules], capture_output=True, text=True, check=True)
           for modules in (controller, ("stages.score.tasks",))]
    assert [r.stdout.strip() for r in ran] == ["False", "True"]


# ---- the weight-sync gate -----------------------------------------------------------------------

def test_a_correct_reload_passes_the_gate(reference_run):
    engine = HfEngine(shards.checkpoint_dir(reference_run, 0))
    engine.load_policy(shards.checkpoint_dir(reference_run, 1))
    gap = check_weight_sync(engine, shards.checkpoint_dir(reference_run, 1))
    assert gap["generate/weight_sync_gap_mean"] < 1e-5


def test_another_checkpoints_weights_are_caught(reference_run):
    engine = HfEngine(shards.checkpoint_dir(reference_run, 0))
    load_weights_in_place(engine.model, shards.checkpoint_dir(reference_run, 2))
    with pytest.raises(WeightSyncError, match="v0001"):
        check_weight_sync(engine, shards.checkpoint_dir(reference_run, 1))


def test_a_reload_that_leaves_the_engine_unchanged_is_caught(reference_run):
    engine = HfEngine(shards.checkpoint_dir(reference_run, 0))
    engine.checkpoint = shards.checkpoint_dir(reference_run, 1)  # says v0001, still holds v0000
    with pytest.raises(WeightSyncError, match="does not hold that policy"):
        check_weight_sync(engine, engine.checkpoint)


@pytest.fixture(scope="module")
def one_small_step(tmp_path_factory):
    """v0001 one iteration after v0000 at the card's learning rate, 1e-6 (4 Adam steps, no warm-up)."""
    run = tmp_path_factory.mktemp("small-step") / "run"
    result = orchestrate(run, 1, "-o", "train.lr=1e-6", "-o", "train.warmup_steps=0", "-o", "eval.every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_an_engine_left_at_v_i_after_a_1e_6_step_is_caught_by_its_weights(one_small_step):
    """The probe's log-probs move little at lr 1e-6; the checksums of the weights the engine holds
    cannot miss it. The negative control: the same engine after a real load passes."""
    v0, v1 = shards.checkpoint_dir(one_small_step, 0), shards.checkpoint_dir(one_small_step, 1)
    engine = HfEngine(v0)
    engine.checkpoint = v1  # says v0001, still holds v0000
    with pytest.raises(WeightSyncError, match="not the ones the trainer exported"):
        check_weight_sync(engine, v1)
    engine.load_policy(v1)
    assert check_weight_sync(engine, v1)["generate/weight_sync_gap_mean"] < 1e-5


def test_the_generate_stage_stops_with_one_line_before_sampling(reference_run, tmp_path):
    """v0001's probe says other log-probs than its weights give (e.g. a trainer and an engine that
    disagree on the weights): the stage exits with one line and writes no rollout."""
    run = tmp_path / "gated"
    shutil.copytree(reference_run, run)
    for stage in ("rollouts", "scored", "train", "eval"):
        shards.reset_stage(shards.stage_dir(run, 1, stage))
    shutil.rmtree(shards.checkpoint_dir(run, 2))
    checkpoint = shards.checkpoint_dir(run, 1)
    probe = json.loads((checkpoint / shards.PROBE).read_text())
    probe["logprobs"] = [[value - 0.5 for value in row] for row in probe["logprobs"]]
    (checkpoint / shards.PROBE).write_text(json.dumps(probe))
    shards.seal_checkpoint(checkpoint)  # the files are as the trainer sealed them; only their content lies
    result = subprocess.run([sys.executable, "-m", "stages.generate", "--run", str(run), "--iter", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "weight-sync probe" in result.stderr
    assert not list(shards.stage_dir(run, 1, "rollouts").glob("part-*")) and \
        not list(shards.stage_dir(run, 1, "eval").glob("part-*"))

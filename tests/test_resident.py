"""Resident mode and Dask scoring: engines loaded once and pointed at each new policy in place give
exactly the run that fresh processes give, and the score stage spreads shards over a 2-worker cluster."""
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import assert_same_as_reference, orchestrate

from common import shards
from common.cluster import open_client
from common.config import load_config
from common.run import RUN_CONFIG, load_run_config
from stages.score.__main__ import score_stage


def test_resident_run_equals_the_subprocess_run(reference_run, tmp_path):
    """Iteration 1 samples from v0001 loaded in place into the engine that sampled v0000: its
    rollouts, and every later checkpoint, are byte-identical to fresh processes' (the reference)."""
    run = tmp_path / "resident"
    result = orchestrate(run, 2, "-o", "orchestrator.mode=resident")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_reference(run, reference_run)


def test_score_maps_shards_over_two_workers(reference_run, tmp_path):
    run = tmp_path / "two-workers"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config(reference_run / RUN_CONFIG, ["cluster.workers=2"])
    (run / RUN_CONFIG).write_text((reference_run / RUN_CONFIG).read_text())
    import shutil

    shutil.copytree(shards.checkpoint_dir(reference_run, 0), shards.checkpoint_dir(run, 0))
    rollouts = shards.read_stage(shards.stage_dir(reference_run, 0, "rollouts"), "rollouts")
    out = shards.stage_dir(run, 0, "rollouts")
    for index in range(4):  # four shards of 4 rows
        shards.write_shard(rollouts.slice(index * 4, 4), out, index)
    shards.write_manifest(out, "rollouts", 0, config.hash(), 0.0)
    with open_client(config, processes=True) as client:
        manifest = score_stage(load_run_config(run), run, 0, client)
    assert manifest["metrics"]["score/workers"] == 2
    assert [f["rows"] for f in manifest["files"]] == [4, 4, 4, 4]
    ours = shards.read_stage(shards.stage_dir(run, 0, "scored"), "scored").to_pydict()
    reference = shards.read_stage(shards.stage_dir(reference_run, 0, "scored"), "scored").to_pydict()
    assert ours["prompt_id"] == reference["prompt_id"] and ours["reward"] == reference["reward"]
    gap = max(abs(a - b) for x, y in zip(ours["teacher_logprobs"], reference["teacher_logprobs"]) for a, b in zip(x, y))
    assert gap < 1e-5  # other batch compositions: fp32 rounding only

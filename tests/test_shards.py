"""The shard contract: round-trip, manifests, checksums, schema checks."""
import json

import polars as pl
import pyarrow as pa
import pytest

from common import shards
from common.errors import ContractError


def rollout_rows(n, version="v0000-abc"):
    return [{
        "prompt_id": f"p{k // 2}", "sample_idx": k % 2, "iteration": 3, "policy_version": version,
        "data_source": "tiny_arith", "ground_truth": str(k), "prompt_ids": [1, 2, 3], "response_ids": [4, 5, k],
        "response_text": f"\\boxed{{{k}}}", "rollout_logprobs": [-0.5, -0.25, -1.0], "finish_reason": "stop",
    } for k in range(n)]


def test_round_trip_and_manifest(tmp_path):
    out = shards.stage_dir(tmp_path, 3, "rollouts")
    rows = rollout_rows(10)
    shards.write_shard(pa.Table.from_pylist(rows[:6], schema=shards.ROLLOUT_SCHEMA), out, 0)
    shards.write_shard(pa.Table.from_pylist(rows[6:], schema=shards.ROLLOUT_SCHEMA), out, 1)
    manifest = shards.write_manifest(out, "rollouts", 3, started=0.0, metrics={"m": 1.0})
    assert manifest.rows == 10 and [f.rows for f in manifest.files] == [6, 4]
    assert json.loads((out / shards.MANIFEST).read_text())["metrics"] == {"m": 1.0}
    table = shards.read_stage(out, "rollouts")
    assert table.schema == shards.ROLLOUT_SCHEMA
    assert table.to_pylist() == [{**r, "rollout_logprobs": r["rollout_logprobs"]} for r in rows]
    # What a user types: one stage at a time with polars.
    frame = pl.scan_parquet(out / "*.parquet").collect()
    assert frame.height == 10 and frame["response_ids"].list.len().sum() == 30
    assert not list(out.glob(".*tmp*")), "temporary files must be renamed away"


def test_a_manifest_reads_back_as_the_record_that_wrote_it(tmp_path):
    out = shards.stage_dir(tmp_path, 1, "train")
    written = shards.write_manifest(out, "train", 1, 10.0, {"train/loss": 0.5}, 12.5, policy_version="v0001-a",
                                    produced_checkpoint="checkpoints/v0002", produced_version="v0002-b")
    assert shards.read_manifest(out) == written
    on_disk = json.loads((out / shards.MANIFEST).read_text())
    assert list(on_disk) == ["stage", "iteration", "files", "rows", "started_at", "finished_at", "seconds", "metrics",
                             "policy_version", "produced_checkpoint", "produced_version"]  # unset fields are left out
    assert (on_disk["seconds"], on_disk["files"], written.k, written.teacher_version) == (2.5, [], None, None)


def test_a_manifest_with_a_key_the_record_lacks_is_refused_naming_it(tmp_path):
    out = shards.stage_dir(tmp_path, 0, "rollouts")
    shards.write_manifest(out, "rollouts", 0, 0.0)
    data = json.loads((out / shards.MANIFEST).read_text())
    (out / shards.MANIFEST).write_text(json.dumps({**data, "sampler": "old"}))
    with pytest.raises(ContractError, match="keys a manifest does not have: sampler"):
        shards.read_manifest(out)
    (out / shards.MANIFEST).write_text(json.dumps(data))  # the control: the same manifest without it
    assert shards.read_manifest(out).stage == "rollouts"


def test_unfinished_stage_is_rejected(tmp_path):
    out = shards.stage_dir(tmp_path, 0, "rollouts")
    shards.write_shard(pa.Table.from_pylist(rollout_rows(2), schema=shards.ROLLOUT_SCHEMA), out, 0)
    with pytest.raises(ContractError, match="did not finish"):
        shards.read_stage(out, "rollouts")


def test_altered_or_missing_shard_is_rejected(tmp_path):
    out = shards.stage_dir(tmp_path, 0, "rollouts")
    path = shards.write_shard(pa.Table.from_pylist(rollout_rows(4), schema=shards.ROLLOUT_SCHEMA), out, 0)
    shards.write_manifest(out, "rollouts", 0, started=0.0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ContractError, match="sha256"):
        shards.read_stage(out, "rollouts")
    path.unlink()
    with pytest.raises(ContractError, match="missing"):
        shards.read_stage(out, "rollouts")


def test_missing_column_is_rejected(tmp_path):
    out = shards.stage_dir(tmp_path, 0, "scored")
    shards.write_shard(pa.Table.from_pylist(rollout_rows(2), schema=shards.ROLLOUT_SCHEMA), out, 0)
    shards.write_manifest(out, "scored", 0, started=0.0)
    with pytest.raises(ContractError, match="teacher_logprobs"):
        shards.read_stage(out, "scored")


def test_reading_some_columns_still_verifies_the_whole_shard(tmp_path):
    out = shards.stage_dir(tmp_path, 0, "rollouts")
    rows = [{**r, "student_topk_ids": [[1, 2]] * 3, "student_topk_logprobs": [[-0.1, -2.0]] * 3}
            for r in rollout_rows(4)]
    schema = shards.schema_with_optional("rollouts", list(rows[0]))
    path = shards.write_shard(pa.Table.from_pylist(rows, schema=schema), out, 0)
    shards.write_manifest(out, "rollouts", 0, started=0.0)
    wanted = ["response_ids", "student_topk_ids", "teacher_topk_ids"]  # the last is not in the shard
    table = shards.read_stage(out, "rollouts", wanted)
    assert table.schema.names == ["response_ids", "student_topk_ids"]
    assert table.to_pydict() == {"response_ids": [r["response_ids"] for r in rows],
                                 "student_topk_ids": [r["student_topk_ids"] for r in rows]}
    assert shards.read_files(out, "rollouts", wanted).schema.names == table.schema.names
    path.write_bytes(path.read_bytes()[:-10])  # a column that is not read is still part of the checksum
    with pytest.raises(ContractError, match="sha256"):
        shards.read_stage(out, "rollouts", ["response_ids"])

"""The contract between stages: run layout, Parquet schemas, atomic writes, manifests, readers.

A stage's output folder is complete only when its `_MANIFEST.json` exists; the manifest lists every
file with its row count and sha256, timings and the stage's metrics (the config is the run's
frozen run.yaml). Everything is
written to a temporary name and renamed, so a crash leaves either nothing or a whole file.

Layout of a run folder:
    run.yaml                    resolved config, frozen at the first start
    prompts/train.parquet       the prompt set rendered with the chat template, once per run
    checkpoints/v0003/          HF safetensors + tokenizer + probe.json + DONE (policy version v0003-<hash>)
    iter=0003/rollouts/         part-00000.parquet ... _MANIFEST.json
    iter=0003/scored/           rollouts + teacher log-probs + rewards
    iter=0003/train/            _MANIFEST.json (metrics, produced checkpoint)
    iter=0003/eval/             graded samples of the eval split (every eval.every iterations)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.faults import fault_point

MANIFEST = "_MANIFEST.json"
DONE = "DONE"
PROBE = "probe.json"
ROW_GROUP_ROWS = 256

ROLLOUT_FIELDS = [
    pa.field("prompt_id", pa.string()),
    pa.field("sample_idx", pa.int16()),
    pa.field("iteration", pa.int32()),
    pa.field("policy_version", pa.string()),
    pa.field("data_source", pa.string()),
    pa.field("ground_truth", pa.string()),
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("response_ids", pa.list_(pa.int32())),
    pa.field("response_text", pa.string()),
    pa.field("rollout_logprobs", pa.list_(pa.float32())),
    pa.field("finish_reason", pa.string()),
]
GRADE_FIELDS = [
    pa.field("reward", pa.float32()),
    pa.field("correct", pa.bool_()),
    pa.field("extracted_answer", pa.string()),
    pa.field("verifier_status", pa.string()),
]
ROLLOUT_SCHEMA = pa.schema(ROLLOUT_FIELDS)
SCORED_SCHEMA = pa.schema(ROLLOUT_FIELDS + [pa.field("teacher_logprobs", pa.list_(pa.float32())),
                                            pa.field("teacher_version", pa.string())] + GRADE_FIELDS)
EVAL_SCHEMA = pa.schema(ROLLOUT_FIELDS + GRADE_FIELDS)
SCHEMAS = {"rollouts": ROLLOUT_SCHEMA, "scored": SCORED_SCHEMA, "eval": EVAL_SCHEMA}

# Optional top-k columns ([tokens][k] per row), present only when the config asks for them.
_TOPK_IDS, _TOPK_LOGPROBS = pa.list_(pa.list_(pa.int32())), pa.list_(pa.list_(pa.float32()))
STUDENT_TOPK_FIELDS = [pa.field("student_topk_ids", _TOPK_IDS), pa.field("student_topk_logprobs", _TOPK_LOGPROBS)]
TEACHER_TOPK_FIELDS = [
    pa.field("teacher_topk_ids", _TOPK_IDS),                     # the teacher's own top-k
    pa.field("teacher_topk_logprobs", _TOPK_LOGPROBS),
    pa.field("teacher_student_topk_logprobs", _TOPK_LOGPROBS),   # the teacher at the student's top-k ids
]
OPTIONAL_FIELDS = {"rollouts": STUDENT_TOPK_FIELDS, "scored": STUDENT_TOPK_FIELDS + TEACHER_TOPK_FIELDS, "eval": []}


def schema_with_optional(stage: str, names: list[str]) -> pa.Schema:
    """The stage's required schema plus whichever optional columns `names` contains."""
    return pa.schema(list(SCHEMAS[stage]) + [f for f in OPTIONAL_FIELDS[stage] if f.name in names])


def conform(table: pa.Table, stage: str, columns: list[str] | None = None) -> pa.Table:
    """`table` in the contract's column order and types (required + present optional columns; with
    `columns`, only those of them)."""
    schema = schema_with_optional(stage, table.schema.names)
    if columns is not None:
        schema = pa.schema([f for f in schema if f.name in columns])
    return table.select(schema.names).cast(schema)


def _read_shard(path: Path, stage: str, columns: list[str] | None) -> pa.Table:
    """One shard in the contract's types; with `columns`, only those it has. Leaving the top-k columns
    unread matters: at k = 332 they are 90% of a scored shard and 0.5 s of Python lists."""
    if columns is not None:
        present = pq.read_schema(path).names
        columns = [c for c in columns if c in present]
    return conform(pq.read_table(path, columns=columns), stage, columns)


class ContractError(RuntimeError):
    """A stage input or output breaks the contract (missing, altered, stale or malformed)."""


# ---- layout -------------------------------------------------------------------------------

def iteration_dir(run: Path, iteration: int) -> Path:
    return Path(run) / f"iter={iteration:04d}"


def stage_dir(run: Path, iteration: int, stage: str) -> Path:
    return iteration_dir(run, iteration) / stage


def checkpoint_dir(run: Path, version: int) -> Path:
    return Path(run) / "checkpoints" / f"v{version:04d}"


def checkpoint_ready(path: Path) -> bool:
    return (path / DONE).exists()


def seal_checkpoint(staging: Path) -> None:
    """Write DONE: the sha256 of every file of the checkpoint (optimizer state included), so a
    truncated or altered file is caught before it is loaded; the weights' hash names the policy."""
    files = {str(f.relative_to(staging)): file_sha256(f) for f in sorted(staging.rglob("*"))
             if f.is_file() and f != staging / DONE}
    atomic_write_text(staging / DONE, json.dumps({"weights_sha256": weights_sha256(staging), "files": files},
                                                 indent=1) + "\n")


@dataclass
class Probe:
    """The weight-sync probe beside a trained checkpoint: a few sequences and the trainer's own
    log-probs of their response tokens under that checkpoint's weights. An engine that loaded the
    checkpoint must reproduce them (stages/generate/gate.py) before it samples anything."""
    dtype: str                     # of the trainer's weights: float32 | bfloat16
    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]


def write_probe(checkpoint: Path, probe: Probe) -> None:
    atomic_write_text(Path(checkpoint) / PROBE, json.dumps(asdict(probe)) + "\n")


def read_probe(checkpoint: Path) -> Probe | None:
    """The checkpoint's probe; None for one no trainer wrote (v0000, the student as copied)."""
    path = Path(checkpoint) / PROBE
    return Probe(**json.loads(path.read_text())) if path.exists() else None


def verify_checkpoint(path: Path) -> None:
    """Every file DONE lists exists and matches; optimizer states may have been pruned (all of them)."""
    if not checkpoint_ready(path):
        raise ContractError(f"checkpoint {path} is not complete (no {DONE})")
    files = json.loads((path / DONE).read_text())["files"]
    state_files = [name for name in files if name.startswith("optimizer_state/")]
    pruned = not (path / "optimizer_state").exists()
    for name, digest in files.items():
        if pruned and name in state_files:
            continue
        if not (path / name).exists():
            raise ContractError(f"checkpoint {path}: {name} is missing")
        if file_sha256(path / name) != digest:
            raise ContractError(f"checkpoint {path}: {name} does not match its sha256 in {DONE} (altered or truncated)")


# ---- writing ------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shard(table: pa.Table, out_dir: Path, index: int) -> Path:
    """Write one shard atomically: zstd, row groups of a few hundred rows, no dictionary on lists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"part-{index:05d}.parquet"
    tmp = out_dir / f".{path.name}.tmp-{os.getpid()}"
    plain_columns = [f.name for f in table.schema if not pa.types.is_list(f.type)]
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, use_dictionary=plain_columns)
    fault_point("shard")
    os.replace(tmp, path)
    return path


def write_manifest(out_dir: Path, stage: str, iteration: int, started: float,
                   metrics: dict | None = None, extra: dict | None = None) -> dict:
    """Seal a stage's output folder: list its shards with rows and sha256, then write the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [{"name": p.name, "rows": pq.ParquetFile(p).metadata.num_rows, "bytes": p.stat().st_size,
              "sha256": file_sha256(p)} for p in sorted(out_dir.glob("part-*.parquet"))]
    manifest = {
        "stage": stage,
        "iteration": iteration,
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "started_at": started,
        "finished_at": time.time(),
        "seconds": round(time.time() - started, 3),
        "metrics": metrics or {},
        **(extra or {}),
    }
    fault_point("manifest")
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def reset_stage(out_dir: Path) -> None:
    """Remove a stage's partial output so it can be redone from scratch."""
    if out_dir.exists():
        shutil.rmtree(out_dir)


# ---- reading ------------------------------------------------------------------------------

def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def verify_stage(out_dir: Path) -> dict:
    """The manifest of a complete stage output whose files all exist and match their sha256."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ContractError(f"{out_dir} has no {MANIFEST}: the stage did not finish")
    for entry in manifest["files"]:
        path = Path(out_dir) / entry["name"]
        if not path.exists():
            raise ContractError(f"{path} is named in the manifest but missing")
        if file_sha256(path) != entry["sha256"]:
            raise ContractError(f"{path} does not match its manifest sha256 (altered or truncated)")
    return manifest


def stage_finished(out_dir: Path) -> bool:
    """True when the stage's output is sealed and intact. A sealed output that fails verification
    (a truncated, altered or missing file) is removed, with a warning, so the stage is redone."""
    if read_manifest(out_dir) is None:
        return False
    try:
        verify_stage(out_dir)
        return True
    except ContractError as error:
        print(f"warning: {error}; redoing {out_dir}", file=sys.stderr, flush=True)
        reset_stage(out_dir)
        return False


def read_files(out_dir: Path, stage: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of a stage's shards written so far (before its manifest seals them), in shard order;
    with `columns`, only those of them the shards have."""
    tables = [_read_shard(p, stage, columns) for p in sorted(Path(out_dir).glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else conform(SCHEMAS[stage].empty_table(), stage, columns)


def read_stage(out_dir: Path, stage: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a verified stage output, checked against the stage's schema; with `columns`, only
    those of them the shards have (every file is still verified whole)."""
    manifest = verify_stage(out_dir)
    paths = [Path(out_dir) / entry["name"] for entry in manifest["files"]]
    for path in paths:
        present = pq.read_schema(path).names
        missing = [f.name for f in SCHEMAS[stage] if f.name not in present]
        if missing:
            raise ContractError(f"{out_dir}: shard lacks required column(s) {missing}")
    if not paths:
        return conform(SCHEMAS[stage].empty_table(), stage, columns)
    return pa.concat_tables([_read_shard(p, stage, columns) for p in paths])


# ---- content hashes -------------------------------------------------------------------------

def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(checkpoint_dir: str | Path) -> str:
    """sha256 of model.safetensors; for a sharded checkpoint, of the shards' sha256s in name order."""
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir} holds no *.safetensors weights")
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def policy_version(checkpoint_dir: str | Path) -> str:
    """`<checkpoint name>-<first 12 hex of the weights' sha256>`: an id plus a content hash.

    A finished pipeline checkpoint records the hash in its DONE marker, so it is not recomputed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    done = checkpoint_dir / "DONE"
    digest = json.loads(done.read_text())["weights_sha256"] if done.exists() else weights_sha256(checkpoint_dir)
    return f"{checkpoint_dir.name}-{digest[:12]}"

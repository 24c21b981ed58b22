"""The contract between stages: run layout, Parquet schemas, atomic writes, manifests, readers.

A stage's output folder is complete only when its `_MANIFEST.json` exists; the manifest lists every
file with its row count and sha256, timings and the stage's metrics (the config is the run's
frozen run.yaml). Everything is
written to a temporary name and renamed, so a crash leaves either nothing or a whole file.

Layout of a run folder:
    run.yaml                    resolved config, frozen at the first start
    prompts/train.parquet       the prompt set rendered with the chat template, once per run
    checkpoints/v0003/          HF safetensors + tokenizer + probe.json + POLICY, then optimizer_state/ + DONE
                                (policy version v0003-<hash of the weights>)
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import ContractError
from common.faults import fault_point

MANIFEST = "_MANIFEST.json"
DONE = "DONE"        # a checkpoint's every file, optimizer state included, sealed
POLICY = "POLICY"    # its policy (weights, tokenizer, probe) sealed: engines may load it
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
                                            pa.field("teacher", pa.string()),  # which teacher scored the row
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


# ---- layout -------------------------------------------------------------------------------

def iteration_dir(run: Path, iteration: int) -> Path:
    return Path(run) / f"iter={iteration:04d}"


def stage_dir(run: Path, iteration: int, stage: str) -> Path:
    return iteration_dir(run, iteration) / stage


def checkpoint_dir(run: Path, version: int) -> Path:
    return Path(run) / "checkpoints" / f"v{version:04d}"


def checkpoint_ready(path: Path) -> bool:
    """Complete: weights, probe and optimizer state all sealed (DONE). Training may continue from it."""
    return (path / DONE).exists()


def policy_ready(path: Path) -> bool:
    """The policy part is sealed (POLICY, or DONE): an engine may load it and sample from it, while the
    optimizer state may still be being written (stages/train/stage.py)."""
    return (path / POLICY).exists() or (path / DONE).exists()


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} of files under `root`: what a checkpoint's markers record."""
    return {name: {"sha256": file_sha256(root / name), "bytes": (root / name).stat().st_size} for name in names}


def _seal(path: Path, marker: str, files: dict[str, dict]) -> None:
    digests = {name: entry["sha256"] for name, entry in files.items()}
    sizes = {name: entry["bytes"] for name, entry in files.items()}
    atomic_write_text(path / marker, json.dumps({"weights_sha256": _weights_digest(path, digests), "files": digests,
                                                 "bytes": sizes}, indent=1) + "\n")


def seal_policy(path: Path, files: dict[str, dict] | None = None) -> dict[str, dict]:
    """Write POLICY: the sha256 and size of every file of the checkpoint as it is now (weights,
    tokenizer, probe: what an engine loads). `files`: the writer's own hashes (hash_files), else
    computed here. Returns them."""
    files = files if files is not None else hash_files(path, _file_names(path))
    _seal(path, POLICY, files)
    return files


def seal_checkpoint(path: Path, known: dict[str, dict] | None = None) -> None:
    """Write DONE: every file's sha256 and size (optimizer state included), so a truncated or altered
    file is caught before it is loaded; the weights' hash names the policy. `known`: hashes the
    writers took as they wrote (hash_files), trusted as they are, so each file is hashed once; any
    other file is hashed here."""
    known = dict(known or {})
    _seal(path, DONE, {**known, **hash_files(path, [name for name in _file_names(path) if name not in known])})


def _file_names(path: Path) -> list[str]:
    return [str(f.relative_to(path)) for f in sorted(Path(path).rglob("*"))
            if f.is_file() and f.name not in (DONE, POLICY) and not f.name.startswith(".")]


def _marker(path: Path, name: str) -> dict:
    return json.loads((Path(path) / name).read_text())


def _weights_digest(path: Path, digests: dict[str, str]) -> str:
    """sha256 of model.safetensors; for a sharded checkpoint, of the shards' sha256s in name order."""
    weights = sorted(name for name in digests if name.endswith(".safetensors") and "/" not in name)
    if not weights:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    if len(weights) == 1:
        return digests[weights[0]]
    return hashlib.sha256("".join(digests[name] for name in weights).encode()).hexdigest()


@dataclass
class Probe:
    """The weight-sync probe beside a trained checkpoint: a few sequences and the trainer's own
    log-probs of their response tokens under that checkpoint's weights. An engine that loaded the
    checkpoint must reproduce them (stages/generate/gate.py) before it samples anything."""
    dtype: str                     # of the trainer's weights: float32 | bfloat16
    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]
    # Exact checksums of the exported weights (common/weights.py): per tensor, and over all of them.
    checksums: dict[str, int] | None = None
    bit_sum: int | None = None


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
    _verify(path, DONE, skip_state=not (path / "optimizer_state").exists())


def verify_policy(path: Path, trusted: bool = False) -> None:
    """The files an engine loads (all but the optimizer state) exist with the sizes and sha256 their
    marker records. `trusted`: the caller saw this checkpoint's writer hash it in this run, so only
    the sizes are checked (re-hashing a 1.7B policy every iteration costs seconds for nothing)."""
    if not policy_ready(path):
        raise ContractError(f"checkpoint {path} is not complete (no {POLICY} or {DONE})")
    _verify(path, DONE if checkpoint_ready(path) else POLICY, skip_state=True, sizes_only=trusted)


def _verify(path: Path, marker: str, skip_state: bool, sizes_only: bool = False) -> None:
    record = _marker(path, marker)
    sizes = record.get("bytes", {})  # checkpoints sealed before sizes were recorded have none
    for name, digest in record["files"].items():
        if skip_state and name.startswith("optimizer_state/"):
            continue
        file = Path(path) / name
        if not file.exists():
            raise ContractError(f"checkpoint {path}: {name} is missing")
        if name in sizes and file.stat().st_size != sizes[name]:
            raise ContractError(f"checkpoint {path}: {name} has another size than {marker} records (altered or "
                                "truncated)")
        if not sizes_only and file_sha256(file) != digest:
            raise ContractError(f"checkpoint {path}: {name} does not match its sha256 in {marker} (altered or "
                                "truncated)")


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


@dataclass(frozen=True)
class ShardFile:
    """One shard a manifest seals."""
    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A sealed stage folder's `_MANIFEST.json`: its shards, when the stage ran, what it measured, and
    which models it came from. `seconds` runs from its first shard's start to its last shard's end."""
    stage: str
    iteration: int
    files: tuple[ShardFile, ...]
    rows: int
    started_at: float
    finished_at: float
    seconds: float
    metrics: dict[str, float]
    policy_version: str | None = None             # rollouts, eval, train: the policy that sampled or was trained
    k: int | None = None                          # eval: samples per prompt
    teacher_version: dict[str, str] | None = None  # scored: each teacher's version, by name
    produced_checkpoint: str | None = None        # train: the checkpoint of v_{i+1}
    produced_version: str | None = None           # train: its policy version

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> Manifest:
        unknown = set(data) - {field.name for field in fields(cls)}
        if unknown:
            raise ContractError(f"{path} has keys a manifest does not have: {', '.join(sorted(unknown))} "
                                f"(fix: it was written by another version of this pipeline; start a new run)")
        return cls(**{**data, "files": tuple(ShardFile(**entry) for entry in data["files"])})


def write_manifest(out_dir: Path, stage: str, iteration: int, started: float, metrics: dict | None = None,
                   finished: float | None = None, **models: object) -> Manifest:
    """Seal a stage's output folder: list its shards with rows and sha256, then write the manifest.
    `finished`: when the stage's output was whole, if earlier than now (default: now); `models`: the
    Manifest's version fields."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = tuple(ShardFile(p.name, pq.ParquetFile(p).metadata.num_rows, p.stat().st_size, file_sha256(p))
                  for p in sorted(out_dir.glob("part-*.parquet")))
    finished = finished or time.time()
    manifest = Manifest(stage, iteration, files, sum(f.rows for f in files), started, finished,
                        round(finished - started, 3), metrics or {}, **models)
    fault_point("manifest")
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest.to_json(), indent=1) + "\n")
    return manifest


def reset_stage(out_dir: Path) -> None:
    """Remove a stage's partial output so it can be redone from scratch."""
    if out_dir.exists():
        shutil.rmtree(out_dir)


# ---- reading ------------------------------------------------------------------------------

def read_manifest(out_dir: Path) -> Manifest | None:
    path = Path(out_dir) / MANIFEST
    return Manifest.from_json(json.loads(path.read_text()), path) if path.exists() else None


def trained_iterations(run: Path) -> int:
    """k: iterations 0..k-1 have a sealed train stage (v_k's checkpoint is not checked here)."""
    k = 0
    while read_manifest(stage_dir(run, k, "train")) is not None:
        k += 1
    return k


def verify_stage(out_dir: Path) -> Manifest:
    """The manifest of a complete stage output whose files all exist and match their sha256."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ContractError(f"{out_dir} has no {MANIFEST}: the stage did not finish")
    for entry in manifest.files:
        path = Path(out_dir) / entry.name
        if not path.exists():
            raise ContractError(f"{path} is named in the manifest but missing")
        if file_sha256(path) != entry.sha256:
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
    paths = [Path(out_dir) / entry.name for entry in manifest.files]
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


def policy_version(checkpoint_dir: str | Path) -> str:
    """`<checkpoint name>-<first 12 hex of the weights' sha256>`: an id plus a content hash.

    A pipeline checkpoint records the hash in its POLICY / DONE marker, so it is not recomputed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    marker = next((checkpoint_dir / name for name in (DONE, POLICY) if (checkpoint_dir / name).exists()), None)
    if marker is not None:
        digest = json.loads(marker.read_text())["weights_sha256"]
    else:  # a model folder of the user's (the teacher, a hub snapshot)
        names = [f.name for f in checkpoint_dir.glob("*.safetensors")]
        digest = _weights_digest(checkpoint_dir, {name: file_sha256(checkpoint_dir / name) for name in names})
    return f"{checkpoint_dir.name}-{digest[:12]}"

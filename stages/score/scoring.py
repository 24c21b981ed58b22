"""The score stage, shard by shard: scored shard k = rollout shard k + the teacher's log-prob of
every sampled token + the rule reward.

`score_shard` scores one rollout shard, each row by the teacher of its data_source (`score.teachers`,
common/config.py: teacher_routes; one teacher for all by default; stages/score/teacher.py), while the
verifier grades it in its own processes; every row records which teacher scored it (`teacher`,
`teacher_version`); `seal_scored` writes the manifest with the iteration's
metrics once every shard is there. A stage process runs them in order; resident workers run the
shards in parallel, each as soon as its rollout shard is written (orchestrator/roles.py).
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from common import shards
from common.config import Config, teacher_for, teacher_name, teacher_routes
from common.flops import forward_flops, mfu, peak_flops
from common.hub import local_model_dir
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks
from common.progress import stage_summary
from common.shards import policy_version
from common.verifier import grade_batch
from common.verifier.status import ERROR, NO_ANSWER
from stages.score import mechanism

# What the teachers (scorer.score) and the verifier read of a rollout shard: not the student's top-k
# log-probs, which at a large k are most of the shard.
SCORING_INPUTS = ("prompt_ids", "response_ids", "student_topk_ids", "response_text", "ground_truth", "data_source")
TEACHER_INPUTS = ("prompt_ids", "response_ids", "student_topk_ids")


@dataclass(frozen=True)
class RolloutShard:
    """A sealed (or just written) rollout shard a score job reads, checked against its sha256."""
    file: str
    sha256: str


@dataclass(frozen=True)
class ScoredShard:
    """What one scored shard tells the seal (and, over Dask, the controller)."""
    index: int
    forward_seconds: float         # the teachers' forward over the shard's rows
    forward_tokens: int            # prompt + response tokens they ran over
    forward_flops: float | None    # None where a teacher's weights are not at hand (a served teacher)
    peak_flops: float | None       # of the device that ran it; None where unknown (a CPU)
    started: float
    finished: float
    peak_gpu_gib: float
    peak_rss_gib: float
    worker: str = ""


def routed_scores(config: Config, columns: dict, scorer_for: Callable[[str], object]) -> tuple[dict, list[str]]:
    """Every row's teacher columns from the teacher of its data_source (one scorer call per teacher,
    rows in their order), and each row's teacher model."""
    models = [teacher_for(config, source) for source in columns["data_source"]]
    result: dict[str, list] = {}
    for model in dict.fromkeys(models):
        rows = [k for k, m in enumerate(models) if m == model]
        part = scorer_for(model).score({name: [columns[name][k] for k in rows] for name in TEACHER_INPUTS
                                        if name in columns})
        for name, values in part.items():
            column = result.setdefault(name, [None] * len(models))
            for k, value in zip(rows, values):
                column[k] = value
    return result, models


def start_scoring(config: Config, run: Path, iteration: int) -> bool:
    """False when iter=i/scored/ is sealed already; else clear any unsealed scored output."""
    out_dir = shards.stage_dir(run, iteration, "scored")
    if shards.stage_finished(out_dir):
        return False
    shards.reset_stage(out_dir)
    return True


def sealed_rollouts(run: Path, iteration: int) -> list[RolloutShard]:
    """The rollout shards of a sealed iter=i/rollouts/ (name and sha256), checked against the manifest."""
    return [RolloutShard(entry["name"], entry["sha256"])
            for entry in shards.verify_stage(shards.stage_dir(run, iteration, "rollouts"))["files"]]


def score_shard(config: Config, run: Path, iteration: int, rollout_file: Path, scorer_for: Callable[[str], object],
                versions: dict[str, str]) -> ScoredShard:
    """Teacher columns and grades for one rollout shard -> the scored shard of the same number.
    `scorer_for(model)` is the scorer holding that teacher; `versions` each teacher's version."""
    rollouts = pq.read_table(rollout_file)
    columns = rollouts.select([c for c in SCORING_INPUTS if c in rollouts.schema.names]).to_pydict()
    sc = config.score
    started = time.time()
    reset_peaks()  # a resident worker reports this shard's peaks, not its lifetime's
    # The verifier works in its own processes: grade while the teacher runs.
    with ThreadPoolExecutor(1) as background:
        grading = background.submit(grade_batch, list(zip(columns["response_text"], columns["ground_truth"])),
                                    sc.reward_mode, sc.verifier_workers, sc.verifier_timeout_s)
        forward_started = time.time()
        teacher_columns, models = routed_scores(config, columns, scorer_for)
        forward_seconds = time.time() - forward_started
        grades = grading.result()
    scored = rollouts
    for name, values in teacher_columns.items():
        scored = scored.append_column(name, pa.array(values))  # `conform` casts to the contract's types
    scored = scored.append_column("teacher", pa.array([teacher_name(m) for m in models], pa.string()))
    scored = scored.append_column("teacher_version", pa.array([versions[m] for m in models], pa.string()))
    scored = scored.append_column("reward", pa.array([g.reward for g in grades], pa.float32()))
    scored = scored.append_column("correct", pa.array([g.correct for g in grades]))
    scored = scored.append_column("extracted_answer", pa.array([g.extracted_answer for g in grades], pa.string()))
    scored = scored.append_column("verifier_status", pa.array([g.status for g in grades]))
    index = int(rollout_file.stem.split("-")[1])
    shards.write_shard(shards.conform(scored, "scored"), shards.stage_dir(run, iteration, "scored"), index)
    forward_tokens = sum(map(len, columns["prompt_ids"])) + sum(map(len, columns["response_ids"]))
    lengths = [len(p) + len(r) for p, r in zip(columns["prompt_ids"], columns["response_ids"])]
    flops = [forward_flops(local_model_dir(model), [lengths[k] for k, m in enumerate(models) if m == model])
             for model in dict.fromkeys(models)]
    return ScoredShard(index=index, forward_seconds=forward_seconds, forward_tokens=forward_tokens,
                       forward_flops=None if None in flops else sum(flops),
                       peak_flops=peak_flops(config.cluster.peak_tflops),  # of this worker's device
                       started=started, finished=time.time(), peak_gpu_gib=peak_gpu_gib(), peak_rss_gib=peak_rss_gib())


def seal_scored(config: Config, run: Path, iteration: int, done: list[ScoredShard], started: float, versions: dict[str, str],
                workers: int = 1) -> dict:
    out_dir = shards.stage_dir(run, iteration, "scored")
    wanted = [*mechanism.COLUMNS, "reward", "correct", "verifier_status", "teacher"]
    if config.generate.student_topk and config.score.teacher_topk:
        wanted += mechanism.TOPK_COLUMNS
    columns = shards.read_files(out_dir, "scored", wanted).to_pydict()
    scores = columns["teacher_logprobs"]
    forward_tokens = sum(d.forward_tokens for d in done)  # prompt + response: what the teacher ran over
    reverse_kl, tokens = lp_minus_lq(columns, range(len(scores)))
    rows = len(scores)
    # Each shard's teacher forward ran on one device: the summed seconds are device-seconds.
    flops, peaks = [d.forward_flops for d in done], [d.peak_flops for d in done]
    utilisation = mfu(None if None in flops else sum(flops), sum(d.forward_seconds for d in done), 1,
                      None if None in peaks else min(peaks))
    metrics = {
        "score/tokens_per_s": forward_tokens / max(time.time() - started, 1e-9),  # the stage's, over its wall time
        "score/teacher_tokens_per_s": forward_tokens / max(sum(d.forward_seconds for d in done), 1e-9),
        "score/teacher_forward_s": sum(d.forward_seconds for d in done),
        "score/forward_tokens": forward_tokens,
        **({"score/mfu": utilisation} if utilisation is not None else {}),
        "rollout/reverse_kl": reverse_kl / max(tokens, 1),
        "rollout/reward_mean": sum(columns["reward"]) / rows,
        "rollout/accuracy": sum(columns["correct"]) / rows,
        "rollout/boxed_fraction": sum(s != NO_ANSWER for s in columns["verifier_status"]) / rows,
        # A bug of the verifier's own (status 'error'), never a verdict on the answer: should stay 0.
        "rollout/verifier_errors": sum(s == ERROR for s in columns["verifier_status"]),
        "rollout/teacher_logprob_mean": sum(map(sum, scores)) / max(tokens, 1),
        "score/peak_gpu_gib": max(d.peak_gpu_gib for d in done),
        "score/peak_rss_gib": max(d.peak_rss_gib for d in done),
        "score/workers": workers,
        **mechanism.mechanism_metrics(columns),
        **per_teacher_metrics(columns),
    }
    manifest = shards.write_manifest(out_dir, "scored", iteration, started, metrics,
                                     {"teacher_version": {teacher_name(m): v for m, v in versions.items()}})
    stage_summary("score", iteration, manifest["rows"], forward_tokens, metrics["score/tokens_per_s"],
                  manifest["seconds"],
                  f"accuracy {metrics['rollout/accuracy']:.3f}, reverse KL {metrics['rollout/reverse_kl']:.4f}")
    return manifest


def lp_minus_lq(columns: dict, rows) -> tuple[float, int]:
    """(sum over the rows' tokens of lp - lq, those tokens): the sampled tokens' reverse KL estimate."""
    gap = sum(r - t for k in rows for r, t in zip(columns["rollout_logprobs"][k], columns["teacher_logprobs"][k]))
    return gap, sum(len(columns["teacher_logprobs"][k]) for k in rows)


def per_teacher_metrics(columns: dict) -> dict[str, float]:
    """With several teachers: each one's rows' reverse KL (lp - lq per token) and accuracy."""
    names = sorted(set(columns["teacher"]))
    if len(names) < 2:
        return {}
    metrics = {}
    for name in names:
        rows = [k for k, t in enumerate(columns["teacher"]) if t == name]
        gap, tokens = lp_minus_lq(columns, rows)
        metrics[f"score/{name}/reverse_kl"] = gap / max(tokens, 1)
        metrics[f"rollout/{name}/accuracy"] = sum(columns["correct"][k] for k in rows) / len(rows)
        metrics[f"rollout/{name}/rows"] = len(rows)
    return metrics


@functools.cache
def _version_of(teacher_dir: Path) -> str:
    return policy_version(teacher_dir)


def teacher_versions(config: Config) -> dict[str, str]:
    """Each teacher model's id + weights hash (once per process: hashing a 4B teacher takes tens of seconds);
    a served teacher's weights are not at hand: its name, the endpoint serving it."""
    models = dict.fromkeys(teacher_routes(config).values())
    if config.score.engine == "server":
        return {model: f"{teacher_name(model)}@{config.score.url}" for model in models}
    return {model: _version_of(local_model_dir(model)) for model in models}

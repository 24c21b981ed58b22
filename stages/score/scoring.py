"""The score stage, shard by shard: scored shard k = rollout shard k + the teacher's log-prob of
every sampled token + the rule reward.

`score_shard` scores one rollout shard with a teacher scorer (stages/score/teacher.py) while the
verifier grades it in its own processes; `seal_scored` writes the manifest with the iteration's
metrics once every shard is there. A stage process runs them in order; resident workers run the
shards in parallel, each as soon as its rollout shard is written (orchestrator/roles.py).
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import shards
from common.config import Config
from common.hub import local_model_dir
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks
from common.progress import stage_summary
from common.shards import policy_version
from common.verifier import grade_batch
from common.verifier.status import ERROR, NO_ANSWER
from stages.score import mechanism

# What the teacher (scorer.score) and the verifier read of a rollout shard: not the student's top-k
# log-probs, which at a large k are most of the shard.
SCORING_INPUTS = ("prompt_ids", "response_ids", "student_topk_ids", "response_text", "ground_truth")


def start_scoring(config: Config, run: Path, iteration: int) -> bool:
    """False when iter=i/scored/ is sealed already; else clear any unsealed scored output."""
    out_dir = shards.stage_dir(run, iteration, "scored")
    if shards.stage_finished(out_dir):
        return False
    shards.reset_stage(out_dir)
    return True


def sealed_rollouts(run: Path, iteration: int) -> list[dict]:
    """The rollout shards of a sealed iter=i/rollouts/ (name and sha256), checked against the manifest."""
    return [{"file": entry["name"], "sha256": entry["sha256"]}
            for entry in shards.verify_stage(shards.stage_dir(run, iteration, "rollouts"))["files"]]


def score_shard(config: Config, run: Path, iteration: int, rollout_file: Path, scorer, teacher_version: str) -> dict:
    """Teacher columns and grades for one rollout shard -> the scored shard of the same number."""
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
        teacher_columns = scorer.score(columns)
        forward_seconds = time.time() - forward_started
        grades = grading.result()
    scored = rollouts
    for name, values in teacher_columns.items():
        scored = scored.append_column(name, pa.array(values))  # `conform` casts to the contract's types
    scored = scored.append_column("teacher_version", pa.array([teacher_version] * len(grades)))
    scored = scored.append_column("reward", pa.array([g.reward for g in grades], pa.float32()))
    scored = scored.append_column("correct", pa.array([g.correct for g in grades]))
    scored = scored.append_column("extracted_answer", pa.array([g.extracted_answer for g in grades], pa.string()))
    scored = scored.append_column("verifier_status", pa.array([g.status for g in grades]))
    index = int(rollout_file.stem.split("-")[1])
    shards.write_shard(shards.conform(scored, "scored"), shards.stage_dir(run, iteration, "scored"), index)
    forward_tokens = sum(map(len, columns["prompt_ids"])) + sum(map(len, columns["response_ids"]))
    return {"index": index, "forward_seconds": forward_seconds, "forward_tokens": forward_tokens,
            "started": started, "finished": time.time(), "peak_gpu_gib": peak_gpu_gib(), "peak_rss_gib": peak_rss_gib()}


def seal_scored(config: Config, run: Path, iteration: int, done: list[dict], started: float, teacher_version: str,
                workers: int = 1) -> dict:
    out_dir = shards.stage_dir(run, iteration, "scored")
    wanted = [*mechanism.COLUMNS, "reward", "correct", "verifier_status"]
    if config.generate.student_topk and config.score.teacher_topk:
        wanted += mechanism.TOPK_COLUMNS
    columns = shards.read_files(out_dir, "scored", wanted).to_pydict()
    scores = columns["teacher_logprobs"]
    tokens = sum(map(len, scores))
    forward_tokens = sum(d["forward_tokens"] for d in done)  # prompt + response: what the teacher ran over
    reverse_kl = sum(r - t for rl, sl in zip(columns["rollout_logprobs"], scores) for r, t in zip(rl, sl))
    rows = len(scores)
    metrics = {
        "score/tokens_per_s": forward_tokens / max(time.time() - started, 1e-9),  # the stage's, over its wall time
        "score/teacher_tokens_per_s": forward_tokens / max(sum(d["forward_seconds"] for d in done), 1e-9),
        "score/teacher_forward_s": sum(d["forward_seconds"] for d in done),
        "score/forward_tokens": forward_tokens,
        "rollout/reverse_kl": reverse_kl / max(tokens, 1),
        "rollout/reward_mean": sum(columns["reward"]) / rows,
        "rollout/accuracy": sum(columns["correct"]) / rows,
        "rollout/boxed_fraction": sum(s != NO_ANSWER for s in columns["verifier_status"]) / rows,
        # A bug of the verifier's own (status 'error'), never a verdict on the answer: should stay 0.
        "rollout/verifier_errors": sum(s == ERROR for s in columns["verifier_status"]),
        "rollout/teacher_logprob_mean": sum(map(sum, scores)) / max(tokens, 1),
        "score/peak_gpu_gib": max(d["peak_gpu_gib"] for d in done),
        "score/peak_rss_gib": max(d["peak_rss_gib"] for d in done),
        "score/workers": workers,
        **mechanism.mechanism_metrics(columns),
    }
    manifest = shards.write_manifest(out_dir, "scored", iteration, started, metrics,
                                     {"teacher_version": teacher_version})
    stage_summary("score", iteration, manifest["rows"], forward_tokens, metrics["score/tokens_per_s"],
                  manifest["seconds"],
                  f"accuracy {metrics['rollout/accuracy']:.3f}, reverse KL {metrics['rollout/reverse_kl']:.4f}")
    return manifest


@functools.cache
def _version_of(teacher_dir: Path) -> str:
    return policy_version(teacher_dir)


def teacher_version(config: Config) -> str:
    """The teacher's id + weights hash (once per process: hashing a 4B teacher takes tens of seconds)."""
    return _version_of(local_model_dir(config.model.teacher))

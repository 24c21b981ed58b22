"""The score stage's work on a worker, shard by shard: scored shard k = rollout shard k + the teacher's
log-prob of every sampled token + the rule reward.

`score_shard` scores one rollout shard, each row by the teacher of its data_source (`score.teachers`,
common/config.py: teacher_routes; one teacher for all by default; stages/score/teacher.py), while the
verifier grades it in its own processes; every row records which teacher scored it (`teacher`,
`teacher_version`). Which shards, and the sealing, are the driver's (stages/score/plan.py).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from common import shards
from common.config import Config, teacher_for, teacher_name
from common.devices import peak_flops
from common.flops import forward_flops
from common.hub import local_model_dir
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks
from common.verifier import grade_batch
from stages.score.plan import ScoredShard

# What the teachers (scorer.score) and the verifier read of a rollout shard: not the student's top-k
# log-probs, which at a large k are most of the shard.
SCORING_INPUTS = ("prompt_ids", "response_ids", "student_topk_ids", "response_text", "ground_truth", "data_source")
TEACHER_INPUTS = ("prompt_ids", "response_ids", "student_topk_ids")


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



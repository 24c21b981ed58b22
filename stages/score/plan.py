"""The score stage, planned and sealed: what a driver (the controller, `python -m stages.score`) runs.

Scored shard k = rollout shard k + the teacher's log-prob of every sampled token + the rule reward.
`submit_scoring` hands each rollout shard to an executor (common/executors.py) as a `score_task`
(stages/score/tasks.py), either a sealed shard or the handle of the sample task writing it (then it
waits for that shard alone); `collect_scoring` gathers their summaries (`ScoredShard`) and seals
iter=i/scored/ with the iteration's metrics. Imports no model library.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import metrics as m
from common import shards
from common.config import Config, teacher_name, teacher_routes
from common.devices import SCORE
from common.executors import Executor, Task
from common.flops import mfu
from common.hub import local_model_dir
from common.progress import stage_summary
from common.shards import policy_version
from common.verifier.status import ERROR, NO_ANSWER
from stages.score import mechanism

SCORE_SHARD = Task("stages.score.tasks", "score_task")


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


def start_scoring(config: Config, run: Path, iteration: int) -> bool:
    """False when iter=i/scored/ is sealed already; else clear any unsealed scored output."""
    out_dir = shards.stage_dir(run, iteration, "scored")
    if shards.stage_finished(out_dir):
        return False
    shards.reset_stage(out_dir)
    return True


def sealed_rollouts(run: Path, iteration: int) -> list[RolloutShard]:
    """The rollout shards of a sealed iter=i/rollouts/ (name and sha256), checked against the manifest."""
    return [RolloutShard(entry.name, entry.sha256)
            for entry in shards.verify_stage(shards.stage_dir(run, iteration, "rollouts")).files]


def seal_scored(config: Config, run: Path, iteration: int, done: list[ScoredShard], versions: dict[str, str],
                workers: int = 1) -> shards.Manifest:
    """The scored folder's manifest. Its clock runs from the first shard's start to the last one's end
    (in resident mode scoring starts while sampling goes on)."""
    started, finished = min(d.started for d in done), max(d.finished for d in done)
    out_dir = shards.stage_dir(run, iteration, "scored")
    wanted = [*mechanism.COLUMNS, "reward", "correct", "verifier_status", "teacher"]
    if config.generate.student_topk and config.score.teacher_topk:
        wanted += mechanism.TOPK_COLUMNS
    table = shards.read_files(out_dir, "scored", wanted)
    columns = table.select(["reward", "correct", "verifier_status", "teacher"]).to_pydict()
    lp, lq, lengths = sampled = mechanism.sampled_logprobs(table)
    rows, tokens = table.num_rows, len(lq)
    # lp - lq summed per row: the sampled tokens' reverse KL estimate, overall and per teacher.
    row_gaps = np.bincount(np.repeat(np.arange(rows), lengths), weights=lp - lq, minlength=rows)
    forward_tokens = sum(d.forward_tokens for d in done)  # prompt + response: what the teacher ran over
    # Each shard's teacher forward ran on one device: the summed seconds are device-seconds.
    flops, peaks = [d.forward_flops for d in done], [d.peak_flops for d in done]
    utilisation = mfu(None if None in flops else sum(flops), sum(d.forward_seconds for d in done), 1,
                      None if None in peaks else min(peaks))
    metrics = {
        "score/tokens_per_s": forward_tokens / max(finished - started, 1e-9),  # the stage's, over its wall time
        "score/teacher_tokens_per_s": forward_tokens / max(sum(d.forward_seconds for d in done), 1e-9),
        "score/teacher_forward_s": sum(d.forward_seconds for d in done),
        "score/forward_tokens": forward_tokens,
        **({"score/mfu": utilisation} if utilisation is not None else {}),
        m.REVERSE_KL: float(row_gaps.sum()) / max(tokens, 1),
        "rollout/reward_mean": sum(columns["reward"]) / rows,
        m.ROLLOUT_ACCURACY: sum(columns["correct"]) / rows,
        "rollout/boxed_fraction": sum(s != NO_ANSWER for s in columns["verifier_status"]) / rows,
        # A bug of the verifier's own (status 'error'), never a verdict on the answer: should stay 0.
        "rollout/verifier_errors": sum(s == ERROR for s in columns["verifier_status"]),
        "rollout/teacher_logprob_mean": float(lq.sum()) / max(tokens, 1),
        "score/peak_gpu_gib": max(d.peak_gpu_gib for d in done),
        "score/peak_rss_gib": max(d.peak_rss_gib for d in done),
        "score/workers": workers,
        **mechanism.mechanism_metrics(table, sampled),
        **per_teacher_metrics(columns, row_gaps, lengths),
    }
    manifest = shards.write_manifest(out_dir, "scored", iteration, started, metrics, finished,
                                     teacher_version={teacher_name(t): v for t, v in versions.items()})
    stage_summary("score", iteration, manifest.rows, forward_tokens, metrics["score/tokens_per_s"],
                  manifest.seconds,
                  f"accuracy {metrics[m.ROLLOUT_ACCURACY]:.3f}, reverse KL {metrics[m.REVERSE_KL]:.4f}")
    return manifest


def per_teacher_metrics(columns: dict, row_gaps: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """With several teachers: each one's rows' reverse KL (lp - lq per token) and accuracy."""
    names = sorted(set(columns["teacher"]))
    if len(names) < 2:
        return {}
    metrics = {}
    teachers, correct = np.array(columns["teacher"]), np.array(columns["correct"])
    for name in names:
        rows = teachers == name
        metrics[f"score/{name}/reverse_kl"] = float(row_gaps[rows].sum()) / max(int(lengths[rows].sum()), 1)
        metrics[f"rollout/{name}/accuracy"] = float(correct[rows].mean())
        metrics[f"rollout/{name}/rows"] = int(rows.sum())
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


# ---- the driver -----------------------------------------------------------------------------

def submit_scoring(executor: Executor, config: Config, run: Path, iteration: int, rollouts: list | None = None
                   ) -> list | None:
    """Submit a score task per rollout shard: `rollouts`, the handles of the sample tasks writing them,
    or (None, empty) the sealed shards of iter=i/rollouts/. None when iter=i/scored/ is sealed already."""
    if not start_scoring(config, run, iteration):
        return None
    sources = rollouts or sealed_rollouts(run, iteration)
    versions = teacher_versions(config)
    return [executor.submit(SCORE_SHARD, run, iteration, source, versions, role=SCORE) for source in sources]


def collect_scoring(executor: Executor, config: Config, run: Path, iteration: int, scoring: list | None) -> None:
    """Wait for the scored shards, then seal iter=i/scored/."""
    if scoring is None:
        return
    done = executor.gather(SCORE, iteration, scoring)
    seal_scored(config, run, iteration, done, teacher_versions(config), len({d.worker for d in done}))

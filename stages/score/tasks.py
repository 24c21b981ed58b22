"""The score stage's tasks, run by a worker (common/executors.py): a local stage process or a resident
Dask worker, which keeps each teacher it has served open (common/worker.py).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common import shards, worker
from common.config import Config, teacher_routes
from common.errors import ContractError
from common.libraries import task_config
from common.shards import file_sha256
from common.verifier import start as start_verifier
from stages.score.plan import RolloutShard, ScoredShard
from stages.score.scoring import score_shard
from stages.score.teacher import Teachers


def teachers(config: Config) -> Teachers:
    """This worker's teachers: each opened when its first row comes, then kept."""
    return worker.kept("teachers", lambda: Teachers(config))


def score_task(run: Path, iteration: int, rollout: RolloutShard, versions: dict[str, str]) -> ScoredShard:
    """One scored shard from rollout shard `rollout` (a sealed one, or the summary of the sample task that
    wrote it: both carry its file name and sha256, checked here), each row by its data_source's teacher."""
    config = task_config(run)
    path = shards.stage_dir(run, iteration, "rollouts") / rollout.file
    if not path.exists() or file_sha256(path) != rollout.sha256:
        raise ContractError(f"{path} is not the rollout shard that was sampled (missing or altered)")
    return replace(score_shard(config, run, iteration, path, teachers(config), versions), worker=worker.NAME)


def open_task(run: Path, iteration: int) -> None:
    """Open every teacher and the verifier's workers ahead of the first iteration (a resident worker does
    it while the controller starts)."""
    config = task_config(run)
    for model in dict.fromkeys(teacher_routes(config).values()):
        teachers(config)(model)
    start_verifier(config.score.verifier_workers)

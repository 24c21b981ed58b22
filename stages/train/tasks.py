"""The train stage's tasks, run by a worker (common/executors.py): one local process per rank for one
iteration, or a resident Dask worker with a `train-rank-<r>` resource, which keeps rank r's DeepSpeed
engine and optimizer state across iterations (common/worker.py).
"""
from __future__ import annotations

from pathlib import Path

from common import shards, worker
from common.config import Config
from common.libraries import task_config
from stages.train.records import PolicyWritten, StateWritten
from stages.train.stage import Trainer, train_policy, write_optimizer_state


def trainer(config: Config, rank: int, world: int, address: str) -> Trainer:
    """This worker's rank (it joins the ranks' process group once, at `address`), opened on first use and kept."""
    return worker.kept("trainer", lambda: Trainer(config, rank, world, address))


def train_task(run: Path, iteration: int, rank: int, world: int, address: str) -> PolicyWritten | None:
    """Rank `rank` of iteration i's steps and v_{i+1}'s policy; rank 0 returns its account."""
    config = task_config(run)
    worker.sleep_all()  # a generation engine beside this rank frees its GPU memory
    return train_policy(config, run, iteration, trainer(config, rank, world, address))


def optimizer_state_task(run: Path, iteration: int, rank: int, policy_files: dict | None) -> StateWritten | None:
    """Rank `rank` writes v_{i+1}'s optimizer state from its trainer (rank 0 then seals DONE and returns the
    StateWritten). On a Dask worker the task secedes from the worker's one task slot first, so the
    worker samples and scores iteration i+1 meanwhile: the write is off the critical path. The
    trainer's lock keeps the engine from stepping or closing until it is done."""
    worker.leave_task_slot()
    return write_optimizer_state(task_config(run), run, iteration, worker.kept("trainer"), policy_files)


def open_rank_task(run: Path, iteration: int, rank: int, world: int, address: str) -> None:
    """Rank `rank`'s trainer on v_i (verified), opened ahead of the first iteration; every rank at once (they
    meet at `address`)."""
    config = task_config(run)
    trainer(config, rank, world, address).open_at(shards.checkpoint_dir(run, iteration))

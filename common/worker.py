"""A worker process: what it keeps open between tasks, its name in the shard summaries, the run's config.

A stage task (stages/*/tasks.py) runs in a worker process: one of LocalExecutor's (common/executors.py),
which live for one stage, or a resident Dask worker (orchestrator/roles.py), which lives for the
whole run. Either way a task keeps its models open here (`keep`) for the next task, and they are
closed when the process ends (`close_all`). Imports no model library: the Dask plugin that calls
close_all is built in the controller.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from common.config import Config
from common.errors import ContractError
from common.run import RUN_CONFIG, load_run_config

NAME = ""  # the worker's address (Dask) or "local-<role>" (LocalExecutor): generate/workers, score/workers count them
ON_DASK = False  # set by the resident plugin (orchestrator/roles.py)
_closers: dict[str, Callable[[], None]] = {}
_sleepers: dict[str, Callable[[], None]] = {}
_configs: dict[tuple, Config] = {}
_kept: dict[str, Closable] = {}


class Closable(Protocol):
    def close(self) -> None: ...


Kept = TypeVar("Kept", bound=Closable)


def keep(name: str, close: Callable[[], None], sleep: Callable[[], None] | None = None) -> None:
    """Register how to close what a task module keeps open (one per name), and how to free its GPU
    memory while another role of this worker computes (`sleep`: the generation engine beside a rank)."""
    _closers[name] = close
    if sleep is not None:
        _sleepers[name] = sleep


def kept(name: str, open_it: Callable[[], Kept] | None = None) -> Kept:
    """What this worker keeps under `name` (a trainer rank, the teachers): opened by `open_it()` on first
    use, then kept for the next task; its `close()` runs when the process ends. Without `open_it`, the one
    an earlier task opened."""
    if name not in _kept:
        if open_it is None:
            raise ContractError(f"this worker holds no {name}: the task that opens it did not run here")
        _kept[name] = open_it()
        keep(name, lambda: _close_kept(name))
    return _kept[name]  # type: ignore[return-value]


def _close_kept(name: str) -> None:
    held = _kept.pop(name, None)  # closed once, however often the process's closers run
    if held is not None:
        held.close()


def sleep_all() -> None:
    """Free the GPU memory of what this worker keeps for other roles (a no-op on a CPU): a training rank
    steps beside its worker's generation engine."""
    for sleep in _sleepers.values():
        sleep()


def close_all() -> None:
    """Close everything the tasks kept (vLLM's EngineCore must shut down while its parent is alive)."""
    for close in reversed(list(_closers.values())):
        close()


def leave_task_slot() -> None:
    """On a resident Dask worker, give up its one task slot (distributed.secede), so its next task runs
    while this one goes on; elsewhere nothing to do."""
    if ON_DASK:
        from distributed import secede

        secede()


def frozen_config(run: Path) -> Config:
    """The run's frozen config, parsed and validated once per version of the file (every task reads it:
    milliseconds on the critical path), a fresh copy per task."""
    stat = (Path(run) / RUN_CONFIG).stat()
    key = (str(run), stat.st_mtime_ns, stat.st_size)
    if key not in _configs:
        _configs.clear()
        _configs[key] = load_run_config(run)
    return copy.deepcopy(_configs[key])

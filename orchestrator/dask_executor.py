"""The resident executor: a stage's tasks as Dask tasks on workers that keep their models loaded.

`orchestrator.mode: resident` (orchestrator/cluster.py opens the cluster). A task goes to whichever
worker with its role (a Dask resource) is free; a task whose arguments are other tasks' futures
(scoring shard k takes rollout shard k's) runs once they are done, on any worker. At start every
worker opens what its roles need (`open_models`), while the controller is still starting, so the
first iteration pays for none of it; the ranks meet once, at an address fixed for the cluster's life.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed import Client, KilledWorker, wait

from common.devices import GENERATE, SCORE, train_role
from common.executors import ACTIONABLE, Task, stage_failed
from orchestrator.roles import rendezvous_address

OPEN_ENGINE = Task("stages.generate.tasks", "open_task")
OPEN_TEACHERS = Task("stages.score.tasks", "open_task")
OPEN_RANK = Task("stages.train.tasks", "open_rank_task")


class DaskExecutor:
    def __init__(self, client: Client):
        self.client = client
        self.address: Any = None  # the ranks' rendezvous: a future until first needed, then host:port
        self.opening: list = []  # open tasks, waited for before the first stage's tasks
        self.opened_at = 0

    def submit(self, task: Task, *args: Any, role: str):
        if self.opening:  # the first stage waits for the models (a failed open says so)
            opening, self.opening = self.opening, []
            self.gather("open", self.opened_at, opening)
        return self.client.submit(task, *args, resources={role: 1}, pure=False)

    def gather(self, stage: str, iteration: int, handles: list) -> list:
        """The tasks' results; a failure a user can act on (a lost worker, bad data, a failed gate, a NaN)
        stops the stage with one line. Anything else is a bug and keeps its traceback."""
        try:
            return self.client.gather(handles)
        except (KilledWorker, *ACTIONABLE) as error:
            self.client.cancel(handles)
            what = "a worker died" if isinstance(error, KilledWorker) else str(error).splitlines()[0]
            raise stage_failed(stage, iteration, what, error) from error

    def done(self, handles: list) -> bool:
        return all(future.done() for future in handles)

    def rendezvous(self) -> str:
        if self.address is None:
            self.address = self.client.submit(rendezvous_address, resources={train_role(0): 1}, pure=False)
        if not isinstance(self.address, str):
            self.address = self.gather("train", self.opened_at, [self.address])[0]
        return self.address

    def open_models(self, run: Path, iteration: int, world: int) -> None:
        """Every worker opens what its roles need at v_i now, in its own process: first its generation
        engine, teachers and verifier workers, then, once all of those are open, the training ranks, all
        at once (so no rank waits at the rendezvous for a load that failed)."""
        workers = {address: info.get("resources", {})
                   for address, info in self.client.scheduler_info(n_workers=-1)["workers"].items()}
        models = [self.client.submit(opener, run, iteration, workers=[address], pure=False)
                  for address, roles in workers.items()
                  for opener, role in ((OPEN_ENGINE, GENERATE), (OPEN_TEACHERS, SCORE)) if role in roles]
        self.address = self.client.submit(rendezvous_address, *models, resources={train_role(0): 1}, pure=False)
        ranks = [self.client.submit(OPEN_RANK, run, iteration, rank, world, self.address,
                                    resources={train_role(rank): 1}, pure=False) for rank in range(world)]
        self.opening, self.opened_at = models + ranks, iteration

    def close(self) -> None:
        """Let opens that no stage waited for end before the workers close."""
        if self.opening:
            wait(self.opening)
            self.opening = []

"""Where a stage's tasks run: plan -> run -> seal, with the run part behind an executor.

Every stage is planned and sealed by the process that drives it (the controller, or a
`python -m stages.<stage>` command): stages/*/plan.py lists the shard jobs, hands each to an
executor as a task, and seals the folder from the records the tasks return. A task is named by its
module and function (`Task`), so the driver sends it without importing it: the task modules load
torch and the models, the driver never does. Two executors, one interface (`Executor`):

- `LocalExecutor` (here): `python -m stages.<stage>` and `orchestrator.mode: subprocess`. Each role
  ("generate", "score", "train-rank-<r>") runs its tasks in a fresh process of its own; one stage's
  processes at a time, closed before the next stage's start, so nothing is held between stages.
- `DaskExecutor` (orchestrator/dask_executor.py): `orchestrator.mode: resident`, workers that keep
  their models loaded for the whole run.

A task's arguments may be handles of earlier tasks (scoring shard k takes rollout shard k's): it
runs once they are done, with their results.
"""
from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.errors import (
    ConfigError,
    ContractError,
    NonFiniteError,
    StageFailed,
    StalePolicyError,
    WeightSyncError,
)
from common.run import exit_with_parent, free_port

# The failures a user can act on (bad data, a failed gate, a NaN, a stale or altered input): one line.
ACTIONABLE = (ConfigError, ContractError, WeightSyncError, NonFiniteError, StalePolicyError)
GRACE_S = 30.0  # after a task failed, how long its stage's other processes may take to finish and close
STOP_WAIT_S = 120.0  # how long a stage's process may take to close its models and exit


@dataclass(frozen=True)
class Task:
    """A stage task by name (module, function): called where it runs, imported only there."""
    module: str
    function: str

    def __call__(self, *args: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.function)(*args)


class Executor(Protocol):
    def submit(self, task: Task, *args: Any, role: str) -> Any:
        """Queue `task(*args)` on a worker holding `role`; returns a handle (args may be handles)."""

    def gather(self, stage: str, iteration: int, handles: list) -> list:
        """The tasks' results in order; an actionable failure raises StageFailed with one line."""

    def done(self, handles: list) -> bool:
        """True when every task has finished (gather returns at once)."""

    def rendezvous(self) -> str:
        """host:port where the training ranks of the next train tasks meet."""


def stage_failed(stage: str, iteration: int, what: str, error: BaseException | None = None) -> StageFailed:
    """One line for a stage's failure, with what to do about it."""
    step = "opening the workers' models" if stage == "open" else f"stage {stage}"
    fix = ("nothing was written; check the scored shards' teacher_logprobs and train.lr, then rerun the same "
           "command" if isinstance(error, NonFiniteError) else "rerun the same command to resume")
    return StageFailed(f"{step} failed at iteration {iteration}: {what} (fix: {fix})")


# ---- the local executor ---------------------------------------------------------------------

class WorkerDied(RuntimeError):
    pass


class RemoteTraceback(Exception):
    """A task's traceback in its worker process, chained under the error it raised."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


@dataclass(eq=False)
class LocalHandle:
    task: Task
    args: tuple
    role: str
    sent: bool = False
    finished: bool = False
    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _serve(connection, parent_pid: int, name: str) -> None:
    """A local worker process: run the tasks it is sent, in order, until told to stop; then close
    what they kept open (common/worker.py)."""
    exit_with_parent(parent_pid)  # a killed driver leaves no worker behind
    from common import worker

    worker.NAME = name
    try:
        while (message := connection.recv()) is not None:
            task, args = message
            try:
                connection.send((True, task(*args)))
            except BaseException as error:  # noqa: B036 - reported to the driver, which decides
                text = traceback.format_exc()
                try:
                    connection.send((False, (error, text)))
                except Exception:  # the error does not pickle: its text does
                    connection.send((False, (RuntimeError(f"{type(error).__name__}: {error}"), text)))
    finally:
        worker.close_all()


@dataclass(eq=False)
class LocalWorker:
    """One role's process (spawned: no state inherited from the driver) and its queue of sent tasks."""
    role: str
    waiting: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        # Not a daemon: it starts processes of its own (the verifier's workers, vLLM's EngineCore).
        self.process = context.Process(target=_serve, args=(child, os.getpid(), f"local-{self.role}"),
                                       name=f"opd-{self.role}", daemon=False)
        self.process.start()
        child.close()

    def send(self, handle: LocalHandle, args: list) -> None:
        self.connection.send((handle.task, args))
        handle.sent = True
        self.waiting.append(handle)

    def receive(self) -> None:
        """The result of the oldest task sent and not yet answered."""
        handle = self.waiting.popleft()
        try:
            ok, payload = self.connection.recv()
        except (EOFError, ConnectionError):
            self.process.join(5)
            handle.error = WorkerDied(f"the {self.role} process died (exit code {self.process.exitcode})")
        else:
            if ok:
                handle.value = payload
            else:
                error, text = payload
                error.__cause__ = RemoteTraceback(text)
                handle.error = error
        handle.finished = True

    def stop(self) -> None:
        """Let the tasks sent finish, then end the process (it closes its models first)."""
        while self.waiting:
            self.receive()
        self.end(STOP_WAIT_S, warn=True)

    def end(self, grace: float, warn: bool = False) -> None:
        """Ask the process to end (after the task it runs); kill it if it has not within `grace` seconds."""
        if self.process.is_alive():
            try:
                self.connection.send(None)
            except (BrokenPipeError, ConnectionError):
                pass
            self.process.join(grace)
            if self.process.is_alive():  # stuck, or something it started outlives it: never hang on it
                if warn:
                    print(f"warning: the {self.role} process did not end within {grace:.0f} s of its stage; "
                          "killed", file=sys.stderr, flush=True)
                self.process.kill()
                self.process.join()
        self.connection.close()


def stage_of(role: str) -> str:
    """The roles whose processes live at the same time: every training rank's, or one role's."""
    return "train" if role.startswith("train-rank-") else role


class LocalExecutor:
    """Tasks in fresh local processes, one per role, one stage's at a time (see the module's doc).

    Tasks are sent in the order they were submitted, when a result is first asked for: sampling runs
    when the generate stage is gathered, scoring when the score stage is; a task of another stage
    first ends the processes of the stage before (after their tasks are done). A driver that stops
    for any reason kills what is left (`close`)."""

    def __init__(self) -> None:
        self.queue: deque[LocalHandle] = deque()
        self.workers: dict[str, LocalWorker] = {}
        self.stage: str | None = None

    def submit(self, task: Task, *args: Any, role: str) -> LocalHandle:
        handle = LocalHandle(task, args, role)
        self.queue.append(handle)
        return handle

    def rendezvous(self) -> str:
        return f"127.0.0.1:{free_port()}"  # the ranks' processes are new for every train stage

    def done(self, handles: list) -> bool:
        return all(h.finished for h in handles)

    def gather(self, stage: str, iteration: int, handles: list) -> list:
        try:
            while not all(h.finished for h in handles):
                # One task at a time per process, so that none runs after its stage has failed; the
                # processes of a stage (the training ranks) run theirs at once.
                while self.queue and not all(h.sent for h in handles) and not self._busy(self.queue[0].role):
                    self._send(self.queue.popleft())
                # Whichever process answers first: a rank that died fails the stage at once, even while
                # another rank waits for it in a collective (that one is killed by close()).
                busy = {w.connection: w for w in self.workers.values() if w.waiting}
                for connection in multiprocessing.connection.wait(list(busy)):
                    busy[connection].receive()
                for handle in handles:
                    if handle.error is not None:
                        handle.result()
            return [handle.result() for handle in handles]
        except ACTIONABLE as error:  # the workers are sound: let them close their models
            self.close(grace=GRACE_S)
            raise stage_failed(stage, iteration, str(error).splitlines()[0], error) from error
        except WorkerDied as error:  # its peers may wait for it forever
            self.close()
            raise stage_failed(stage, iteration, str(error)) from error
        except BaseException:
            self.close(grace=GRACE_S)
            raise

    def _busy(self, role: str) -> bool:
        return role in self.workers and bool(self.workers[role].waiting)

    def _finish(self, handle: LocalHandle) -> None:
        while not handle.sent:
            self._send(self.queue.popleft())
        while not handle.finished:
            self.workers[handle.role].receive()

    def _send(self, handle: LocalHandle) -> None:
        args = []
        for arg in handle.args:  # submitted earlier, so sent already: wait for it
            if isinstance(arg, LocalHandle):
                self._finish(arg)
                arg = arg.result()
            args.append(arg)
        stage = stage_of(handle.role)
        if stage != self.stage:
            self.stop()
            self.stage = stage
        if handle.role not in self.workers:
            self.workers[handle.role] = LocalWorker(handle.role)
        self.workers[handle.role].send(handle, args)

    def stop(self) -> None:
        """End the current stage's processes once their tasks are done."""
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            worker.stop()

    def close(self, grace: float = 0.0) -> None:
        """End every process left, after a failure: each may finish its task and close its models within
        `grace` seconds, else it is killed (a rank may wait forever for a peer that failed)."""
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            worker.end(grace)
        self.queue.clear()

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.run_queued()
            self.stop()
        else:
            self.close()

    def run_queued(self) -> None:
        """Finish every task submitted so far (what is left when a driver ends)."""
        while self.queue:
            self._finish(self.queue[0])

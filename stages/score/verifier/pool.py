"""A persistent pool of worker processes for symbolic grading; a worker past the time bound is killed and replaced.

No `signal.alarm`: the parent waits on the workers' pipes with a deadline and SIGKILLs a worker
that misses it, so the bound holds from any thread and even inside C code that ignores signals.

The pool is started on first use and kept for the life of the process, because a fresh worker is
slow twice over: starting it costs the sympy/math-verify imports, and ANTLR's Python runtime builds
the parser's prediction DFA as it meets new answer shapes (a first pass costs 2-4x a warm one).
Workers come from a forkserver that has imported sympy and math-verify and run `warm_up()` once,
so every worker, replacements included, starts warm and never inherits the caller's threads or
CUDA state. One batch uses the pool at a time (a lock), so any thread may call `run_symbolic`.
A process forked from the caller forgets the pool (it belongs to the parent) and starts its own;
`shutdown()` runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from stages.score.verifier.status import ERROR, TIMEOUT, Verdict, error_verdict

# The forkserver imports these before it forks any worker; `warm` runs warm_up() on import.
_PRELOAD = ["stages.score.verifier.equivalence", "math_verify", "sympy", "stages.score.verifier.warm"]
READY = "ready"
START_TIMEOUT_S = 120.0   # a worker that is not ready by then (imports, warm-up) is killed and replaced
SHUTDOWN_WAIT_S = 5.0
MAX_CACHED_GOLDS = 512    # parsed golds a worker keeps within one batch


def _serve(connection: Connection) -> None:
    """A worker: warm up, say ready, then grade jobs until told to stop (None) or the parent goes away."""
    import logging

    from stages.score.verifier.equivalence import symbolic_equal, warm_up

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    warm_up()  # a no-op when the forkserver already did it: workers fork from a warm parser
    connection.send(READY)
    golds: dict[str, list] = {}  # parsed golds of the current batch: a gold is graded n times per prompt
    batch = None
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_batch, index, pred, gold = job
        if job_batch != batch or len(golds) > MAX_CACHED_GOLDS:
            golds, batch = {}, job_batch  # scoped to a batch: the next batch has other prompts
        try:
            result = Verdict(*symbolic_equal(pred, gold, golds))
        except Exception as error:  # math-verify catches its parser's own; what reaches us is a bug of ours
            result = error_verdict(error)
        connection.send((job_batch, index, result))


@dataclass
class _Worker:
    process: mp.Process
    connection: Connection
    started: float
    ready: bool = False
    job: int | None = None        # index of the job it holds
    deadline: float = float("inf")  # for the job, from when the worker is ready


_lock = threading.Lock()
_workers: list[_Worker] = []
_batches = itertools.count()


def _context():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _start() -> _Worker:
    parent, child = mp.Pipe()
    process = _context().Process(target=_serve, args=(child,), daemon=True, name="verifier-worker")
    process.start()
    child.close()
    return _Worker(process, parent, time.monotonic())


def _stop(worker: _Worker, kill: bool) -> None:
    if kill:
        worker.process.kill()
    else:
        try:
            worker.connection.send(None)
        except (BrokenPipeError, OSError):
            worker.process.kill()
    worker.process.join(timeout=SHUTDOWN_WAIT_S)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.connection.close()


def _replace(slot: int) -> _Worker:
    _stop(_workers[slot], kill=True)
    _workers[slot] = _start()
    return _workers[slot]


def run_symbolic(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[Verdict]:
    """symbolic_equal(pred, gold) for every job, in order; timeout where a worker ran past timeout_s, error where
    our code raised or the worker died.

    Always completes: a worker that times out or dies is killed and replaced, and its job is recorded.
    Uses up to `workers` workers of the persistent pool, starting the missing ones.
    """
    if not jobs:
        return []
    with _lock:
        return _run(jobs, workers, timeout_s)


def _run(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[tuple[bool, str]]:
    results: list[tuple[bool, str] | None] = [None] * len(jobs)
    batch = next(_batches)
    size = min(workers, len(jobs))
    for slot, worker in enumerate(_workers[:size]):
        if not worker.process.is_alive():  # died while idle (e.g. killed from outside)
            _replace(slot)
    while len(_workers) < size:
        _workers.append(_start())
    pool = range(size)
    # Jobs are grouped by gold and each gold has a home worker (a stable hash), which works through
    # its groups one at a time: the worker's parse of the gold is cached for the call, and a gold
    # that comes back in a later call (an eval set graded again) meets the parser that learned its shape.
    # A worker with nothing of its own left takes from the end of the busiest queue, so none idles.
    queues: list[deque[deque[int]]] = [deque() for _ in pool]
    by_gold: dict[str, deque[int]] = {}
    for index, (_, gold) in enumerate(jobs):
        if gold not in by_gold:
            by_gold[gold] = deque()
            queues[zlib.crc32(gold.encode()) % size].append(by_gold[gold])
        by_gold[gold].append(index)
    remaining = len(jobs)

    def next_job(slot: int) -> int | None:
        own = queues[slot]
        while own and not own[0]:
            own.popleft()
        if own:
            return own[0].popleft()
        busiest = max(queues, key=lambda queue: sum(map(len, queue)))
        while busiest and not busiest[-1]:
            busiest.pop()
        return busiest[-1].pop() if busiest else None

    def assign(slot: int) -> None:
        index = next_job(slot)
        if index is None:
            return
        worker = _workers[slot]
        try:
            worker.connection.send((batch, index, *jobs[index]))
        except (BrokenPipeError, OSError):  # died since the last check: the job never ran, so retry it once
            worker = _replace(slot)
            worker.connection.send((batch, index, *jobs[index]))
        worker.job = index
        worker.deadline = time.monotonic() + timeout_s if worker.ready else float("inf")

    def finish(slot: int, index: int, result: tuple[bool, str]) -> None:
        nonlocal remaining
        results[index] = result
        remaining -= 1
        _workers[slot].job = None
        assign(slot)

    try:
        for slot in pool:
            assign(slot)
        while remaining:
            busy = [_workers[slot] for slot in pool if _workers[slot].job is not None]
            deadlines = [w.deadline if w.ready else w.started + START_TIMEOUT_S for w in busy]
            ready = wait([w.connection for w in busy], timeout=max(0.0, min(deadlines) - time.monotonic()))
            now = time.monotonic()
            for slot in pool:
                worker = _workers[slot]
                if worker.job is None:
                    continue
                if worker.connection in ready:
                    try:
                        message = worker.connection.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        job, process = worker.job, worker.process
                        _replace(slot)
                        finish(slot, job, Verdict(False, ERROR, f"the worker died (exit code {process.exitcode})"))
                        continue
                    if message == READY:  # the job's clock starts now, not while the worker warmed up
                        worker.ready, worker.deadline = True, now + timeout_s
                    elif message[0] == batch and message[1] == worker.job:
                        finish(slot, worker.job, message[2])
                elif now >= (worker.deadline if worker.ready else worker.started + START_TIMEOUT_S):
                    job = worker.job
                    _replace(slot)
                    finish(slot, job, Verdict(False, TIMEOUT))
    finally:
        # Interrupted mid-batch (e.g. KeyboardInterrupt): a worker still holding a job would answer it
        # into the next batch, so it goes.
        for slot in pool:
            if _workers[slot].job is not None:
                _workers[slot].job = None
                _replace(slot)
    return results  # type: ignore[return-value]


def worker_pids() -> list[int]:
    """Process ids of the pool's live workers (for tests and the benchmark's CPU accounting)."""
    with _lock:
        return [w.process.pid for w in _workers if w.process.is_alive()]


def shutdown() -> None:
    """Stop every worker (politely, then by SIGKILL); the pool starts again on the next call."""
    got = _lock.acquire(timeout=SHUTDOWN_WAIT_S)  # at exit a daemon thread may still hold it mid-batch
    try:
        while _workers:
            worker = _workers.pop()
            _stop(worker, kill=not got or worker.job is not None)
    finally:
        if got:
            _lock.release()


def _forget_after_fork() -> None:
    """In a child forked from the caller: the workers are the parent's, so drop them (never message or
    kill them) and close our copies of their pipes, so that they still see EOF when the parent exits.
    multiprocessing's forkserver record is also the parent's: in a forked child its next use fails
    with ChildProcessError (os.waitpid on a process that is not our child), so let it start a new one.
    """
    global _lock, _workers
    _lock = threading.Lock()  # another thread may have held it at the fork
    for worker in _workers:
        try:
            worker.connection.close()
        except OSError:
            pass
    _workers = []
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
        server._lock = threading.Lock()
    except (AttributeError, OSError):  # another Python's internals: leave them
        pass


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)

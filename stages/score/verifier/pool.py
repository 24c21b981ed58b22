"""Worker processes for symbolic grading, each killed and replaced when it runs past the time bound.

No `signal.alarm`: the parent waits on the workers' pipes with a deadline and SIGKILLs a worker
that misses it, so the bound holds from any thread and even inside C code that ignores signals.
Workers come from a forkserver that has already imported sympy and math-verify, so a replacement
starts in milliseconds and never inherits the caller's threads or CUDA state.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

_PRELOAD = ["stages.score.verifier.equivalence", "math_verify", "sympy"]


def _serve(connection: Connection) -> None:
    import logging

    from stages.score.verifier.equivalence import symbolic_equal

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        index, pred, gold = job
        try:
            result = symbolic_equal(pred, gold)
        except Exception:  # a parser bug on odd input is a parse error, not a crashed batch
            result = (False, "parse_error")
        connection.send((index, result))


@dataclass
class _Worker:
    process: mp.Process
    connection: Connection
    job: int | None = None
    deadline: float = 0.0


def _context():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _start(context) -> _Worker:
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child,), daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent)


def _stop(worker: _Worker, kill: bool) -> None:
    if kill:
        worker.process.kill()
    else:
        try:
            worker.connection.send(None)
        except (BrokenPipeError, OSError):
            worker.process.kill()
    worker.process.join(timeout=5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.connection.close()


def run_symbolic(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[tuple[bool, str]]:
    """symbolic_equal(pred, gold) for every job, in order; (False, "timeout") where a worker ran past timeout_s.

    Always completes: a worker that times out or dies is killed and replaced, and its job is recorded.
    """
    results: list[tuple[bool, str] | None] = [None] * len(jobs)
    if not jobs:
        return []
    context = _context()
    pool = [_start(context) for _ in range(min(workers, len(jobs)))]
    pending = iter(range(len(jobs)))
    remaining = len(jobs)

    def assign(worker: _Worker) -> None:
        index = next(pending, None)
        if index is not None:
            worker.job, worker.deadline = index, time.monotonic() + timeout_s
            worker.connection.send((index, *jobs[index]))

    try:
        for worker in pool:
            assign(worker)
        while remaining:
            busy = [w for w in pool if w.job is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.connection for w in busy], timeout=wait_s)
            now = time.monotonic()
            for slot, worker in enumerate(pool):
                if worker.job is None:
                    continue
                if worker.connection in ready:
                    try:
                        index, result = worker.connection.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        index, result = worker.job, (False, "parse_error")
                        _stop(worker, kill=True)
                        pool[slot] = worker = _start(context)
                elif now >= worker.deadline:
                    index, result = worker.job, (False, "timeout")
                    _stop(worker, kill=True)
                    pool[slot] = worker = _start(context)
                else:
                    continue
                results[index] = result
                remaining -= 1
                worker.job = None
                assign(worker)
    finally:
        for worker in pool:
            _stop(worker, kill=worker.job is not None)
    return results  # type: ignore[return-value]

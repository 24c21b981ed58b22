"""The worker processes of the symbolic tier: one pebble ProcessPool, started on first use and kept for the life
of the process, with a hard time bound per job. How it bounds time (SIGTERM inside C code), starts warm workers
(a preloaded forkserver) and survives timeouts, deaths and forks: docs/verifier.md, "The pool and the time bound".
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import signal
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool

from pebble import ProcessExpired, ProcessPool

from common import worker
from common.verifier.status import ERROR, TIMEOUT, Verdict, describe, error_verdict

# The forkserver imports these before it forks any worker; `warm` runs warm_up() on import.
_PRELOAD = ["common.verifier.symbolic", "math_verify", "sympy", "common.verifier.warm"]
MAX_CACHED_GOLDS = 512    # parsed golds a worker keeps within one batch
STALL_S = 120.0           # no job finished for this long beyond the time bound: the pool is stuck, restart it
SHUTDOWN_WAIT_S = 5.0


# --- in a worker ----------------------------------------------------------------------------------

_golds: dict[str, list] = {}
_golds_batch: int | None = None


def _start_worker() -> None:
    """pebble's initializer: runs in each worker before its first job (so its warm-up is never timed)."""
    import logging

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble stops a worker with SIGTERM: die at once, even in C code
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    from common.verifier.symbolic import warm_up

    warm_up()  # a no-op in a fork of the warmed-up forkserver


def grade_in_worker(batch: int, pred: str, gold: str) -> Verdict:
    """One job: symbolic_equal, with the batch's parsed golds cached. Our exceptions come back as `error`
    verdicts (type and message), never as exceptions: pebble would have to unpickle them in the caller."""
    global _golds, _golds_batch
    from common.verifier.symbolic import symbolic_equal

    if batch != _golds_batch or len(_golds) > MAX_CACHED_GOLDS:
        _golds, _golds_batch = {}, batch  # scoped to a batch: the next batch has other prompts
    try:
        return Verdict(*symbolic_equal(pred, gold, _golds))
    except Exception as error:  # math-verify catches its parser's own exceptions; what reaches us is a bug of ours
        return error_verdict(error)


# --- in the caller --------------------------------------------------------------------------------

_lock = threading.Lock()
_pool: ProcessPool | None = None
_size = 0  # the pool's workers
_start_method = "forkserver"
_batches = itertools.count()


def _started(workers: int) -> ProcessPool:
    """The pool, with at least `workers` workers: started on first use, again after it broke (a worker killed
    while idle breaks a pebble pool) or to grow."""
    global _pool, _size
    if _pool is not None and (not _pool.active or _size < workers):
        _stop()
    if _pool is None:
        context = mp.get_context(_start_method)
        if _start_method == "forkserver":
            context.set_forkserver_preload(_PRELOAD)
        _size = workers
        _pool = ProcessPool(max_workers=workers, initializer=_start_worker, context=context)
    return _pool


def _stop() -> None:
    global _pool
    if _pool is not None:
        _pool.stop()
        _pool.join(timeout=SHUTDOWN_WAIT_S)
        _pool = None


def _verdict(future: Future) -> Verdict:
    try:
        return future.result(timeout=0)
    except TimeoutError:  # pebble's: the job ran past timeout_s and its worker was stopped
        return Verdict(False, TIMEOUT)
    except ProcessExpired as error:  # the worker died on its own (e.g. out of memory)
        return Verdict(False, ERROR, f"the worker died while grading ({describe(error)}, exit code {error.exitcode})")
    except Exception as error:  # the pool broke
        return error_verdict(error)


def run_symbolic(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[Verdict]:
    """symbolic_equal(pred, gold) for every job, in order, at most `workers` at a time.

    Always completes: timeout where a job ran past timeout_s (its worker is replaced), error where our code
    raised or the worker died. A job lost to a broken pool runs once more in a fresh one. A gold's jobs are
    sent one after another, so that a worker that parsed the gold finds it in its cache.
    """
    if not jobs:
        return []
    with _lock:
        return _run(jobs, workers, timeout_s)


def _run(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[Verdict]:
    batch = next(_batches)
    first_of_gold: dict[str, int] = {}
    pending = deque(sorted(range(len(jobs)), key=lambda index: first_of_gold.setdefault(jobs[index][1], index)))
    results: list[Verdict | None] = [None] * len(jobs)
    running: dict[Future, int] = {}
    retried: set[int] = set()
    try:
        while pending or running:
            while pending and len(running) < workers:
                index = pending.popleft()
                future = _started(workers).schedule(grade_in_worker, args=(batch, *jobs[index]), timeout=timeout_s)
                running[future] = index
            done, _ = wait(running, timeout=STALL_S + timeout_s, return_when=FIRST_COMPLETED)
            if not done:  # every job is bounded, so a pool that finishes none is stuck: restart it
                for index in running.values():
                    results[index] = Verdict(False, ERROR, f"no result in {STALL_S + timeout_s:.0f} s; workers restarted")
                running.clear()
                _stop()
                break
            for future in done:
                index = running.pop(future)
                if isinstance(future.exception(), BrokenProcessPool) and index not in retried:
                    retried.add(index)
                    pending.appendleft(index)  # _started() starts a fresh pool
                else:
                    results[index] = _verdict(future)
    finally:
        for future in running:
            future.cancel()  # interrupted (e.g. KeyboardInterrupt): pebble stops the worker of a running job
    return [r if r is not None else Verdict(False, ERROR, "not graded: the pool was stuck") for r in results]


def _ready() -> None:
    """A job that does nothing: its result means a worker is up, warm, and taking jobs."""


def start(workers: int) -> None:
    """Start `workers` workers now rather than at the first answer that needs one (a resident score worker
    calls it while the controller starts, so the first iteration does not pay for it)."""
    with _lock:
        ready = [_started(workers).schedule(_ready) for _ in range(workers)]
    for future in ready:
        future.result()


def shutdown() -> None:
    """Stop every worker; the pool starts again on the next call."""
    got = _lock.acquire(timeout=SHUTDOWN_WAIT_S)  # at exit a daemon thread may still hold it mid-batch
    try:
        _stop()
    finally:
        if got:
            _lock.release()


def _forget_after_fork() -> None:
    """In a child forked from the caller: the workers are the parent's, so drop the handles on them (never stop them)."""
    global _lock, _pool, _start_method
    _lock = threading.Lock()  # another thread may have held it at the fork
    _pool = None
    _start_method = "spawn"  # multiprocessing's record of the forkserver is the parent's too: unusable here


atexit.register(shutdown)
# A worker process (common/worker.py) stops them when it ends: a multiprocessing child joins its live
# children before any atexit handler runs, and would wait for these forever.
worker.keep("verifier workers", shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)

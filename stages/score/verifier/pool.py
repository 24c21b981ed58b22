"""The worker processes of the symbolic tier: a pebble ProcessPool, kept for the life of the process.

The time bound: pebble times each job from when a worker takes it, on a thread of its own, and past
`timeout_s` stops that worker and starts a replacement. It stops a worker with SIGTERM (SIGKILL 3 s
later); our workers restore SIGTERM's default action, for pebble's own handler is Python code that would
wait for the interpreter (e.g. for sympy to leave a C call). So the worker dies at once, the bound holds
whichever thread calls and even inside C code, and there is no `signal.alarm`.

The pool is started on first use and kept, because a fresh worker is slow twice over: starting it costs
the sympy / math-verify imports, and ANTLR's Python runtime builds the parser's prediction DFA as it
meets new answer shapes (a first pass costs several times a warm one). Workers are forked from
multiprocessing's forkserver, which has imported sympy and math-verify and graded the warm-up set once
(its preload), so every worker, replacements after a timeout included, starts warm in milliseconds and
inherits nothing of the caller (threads, CUDA state). Each call is its own batch: a worker caches the
parses of the batch's golds (a gold is graded n times per prompt) and drops them when the next batch
comes; no results are kept between calls.

One call uses the pool at a time (a lock), so any thread may call `run_symbolic`. In a process forked
from the caller the pool is the parent's: that process drops its handle on it (never stops it) and starts
its own, with spawned workers that warm up before their first job, because multiprocessing's record of
the forkserver is the parent's too and cannot be used there. `shutdown()` runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool

from pebble import ProcessExpired, ProcessPool

from stages.score.verifier.status import ERROR, TIMEOUT, Verdict, describe, error_verdict

# The forkserver imports these before it forks any worker; `warm` runs warm_up() on import.
_PRELOAD = ["stages.score.verifier.equivalence", "math_verify", "sympy", "stages.score.verifier.warm"]
MAX_CACHED_GOLDS = 512    # parsed golds a worker keeps within one batch
STALL_S = 120.0           # no job finished for this long (beyond the time bound): the pool is stuck, restart it
SHUTDOWN_WAIT_S = 5.0


# --- in a worker ----------------------------------------------------------------------------------

_golds: dict[str, list] = {}
_golds_batch: int | None = None


def _start_worker() -> None:
    """pebble's initializer: runs in each worker before its first job (so its warm-up is never timed)."""
    import logging

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble stops a worker with SIGTERM: die at once, even in C code
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    from stages.score.verifier.equivalence import warm_up

    warm_up()  # a no-op in a fork of the warmed-up forkserver


def grade_in_worker(batch: int, pred: str, gold: str) -> Verdict:
    """One job: symbolic_equal, with the batch's parsed golds cached. Our exceptions come back as `error`
    verdicts (type and message), never as exceptions: pebble would have to unpickle them in the caller."""
    global _golds, _golds_batch
    from stages.score.verifier.equivalence import symbolic_equal

    if batch != _golds_batch or len(_golds) > MAX_CACHED_GOLDS:
        _golds, _golds_batch = {}, batch  # scoped to a batch: the next batch has other prompts
    try:
        return Verdict(*symbolic_equal(pred, gold, _golds))
    except Exception as error:  # math-verify catches its parser's own exceptions; what reaches us is a bug of ours
        return error_verdict(error)


# --- in the caller --------------------------------------------------------------------------------

class _Context:
    """The multiprocessing context pebble starts the workers with; it remembers them, for worker_pids()."""

    def __init__(self, method: str):
        self._context = mp.get_context(method)
        if method == "forkserver":
            self._context.set_forkserver_preload(_PRELOAD)
        self.processes: list = []

    def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        process = self._context.Process(*args, **kwargs)
        self.processes.append(process)
        return process

    def __getattr__(self, name: str):
        return getattr(self._context, name)


_lock = threading.Lock()
_pool: ProcessPool | None = None
_context: _Context | None = None
_size = 0
_start_method = "forkserver"
_batches = itertools.count()


def _stop_pool() -> None:
    global _pool, _context
    pool, _pool, _context = _pool, None, None
    if pool is not None:
        pool.stop()
        pool.join(timeout=SHUTDOWN_WAIT_S)


def _running_pool(workers: int) -> ProcessPool:
    """The pool, with at least `workers` workers: started on first use, and again after it broke or shrank."""
    global _pool, _context, _size
    if _pool is not None and _pool.active and workers <= _size:
        return _pool
    size = max(workers, _size if _pool is not None else 0)  # a broken pool comes back at its size
    _stop_pool()
    _context = _Context(_start_method)
    _pool, _size = ProcessPool(max_workers=size, initializer=_start_worker, context=_context), size
    return _pool


def _verdict(future: Future) -> Verdict:
    try:
        return future.result(timeout=0)
    except TimeoutError:  # pebble's: the job ran past timeout_s and its worker was stopped
        return Verdict(False, TIMEOUT)
    except ProcessExpired as error:  # the worker died on its own (e.g. out of memory)
        return Verdict(False, ERROR, f"the worker died while grading ({describe(error)}, exit code {error.exitcode})")
    except Exception as error:  # the pool broke
        return error_verdict(error)


def _schedule(pool: ProcessPool, batch: int, jobs: list[tuple[str, str]], timeout_s: float) -> list[Future]:
    return [pool.schedule(grade_in_worker, args=(batch, pred, gold), timeout=timeout_s) for pred, gold in jobs]


def _wait(futures: list[Future], timeout_s: float) -> bool:
    """Wait for every future; False if none finished for STALL_S beyond the time bound (a stuck pool)."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=STALL_S + timeout_s, return_when=FIRST_COMPLETED)
        if not done:
            return False
    return True


def run_symbolic(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[Verdict]:
    """symbolic_equal(pred, gold) for every job, in order, in a pool of at least `workers` workers.

    Always completes: timeout where a job ran past timeout_s (its worker is replaced), error where our code
    raised, the worker died or the pool broke. Jobs that never ran because a worker died outside any job
    (pebble then fails the whole pool and every job it holds) are run once more in a fresh pool.
    """
    if not jobs:
        return []
    with _lock:
        batch = next(_batches)
        futures = _schedule(_running_pool(workers), batch, jobs, timeout_s)
        try:
            stuck = not _wait(futures, timeout_s)
            retry = [k for k, f in enumerate(futures) if f.done() and isinstance(f.exception(), BrokenProcessPool)]
            if retry and not stuck:
                again = _schedule(_running_pool(workers), batch, [jobs[k] for k in retry], timeout_s)
                stuck = not _wait(again, timeout_s)
                for k, future in zip(retry, again):
                    futures[k] = future
        finally:
            for future in futures:
                future.cancel()  # only what is still pending (e.g. on KeyboardInterrupt): pebble stops its worker
        if stuck:
            _stop_pool()
        return [_verdict(f) if f.done() and not f.cancelled() else
                Verdict(False, ERROR, f"no worker finished a job in {STALL_S + timeout_s:.0f} s; the pool was restarted")
                for f in futures]


def worker_pids() -> list[int]:
    """Process ids of the pool's live workers (for tests and the benchmark's CPU accounting)."""
    with _lock:
        if _context is None:
            return []
        # Only the ones that have exited, and in place: pebble's thread may be appending (and starting) a replacement.
        for process in [p for p in _context.processes if p.exitcode is not None]:
            _context.processes.remove(process)
        return [p.pid for p in _context.processes if p.is_alive()]


def shutdown() -> None:
    """Stop every worker; the pool starts again on the next call."""
    global _size
    got = _lock.acquire(timeout=SHUTDOWN_WAIT_S)  # at exit a daemon thread may still hold it mid-batch
    try:
        _stop_pool()
        _size = 0
    finally:
        if got:
            _lock.release()


def _forget_after_fork() -> None:
    """In a child forked from the caller: the pool is the parent's, so drop the handle on it (never stop it)."""
    global _lock, _pool, _context, _size, _start_method
    _lock = threading.Lock()  # another thread may have held it at the fork
    _pool, _context, _size = None, None, 0
    _start_method = "spawn"  # multiprocessing's record of the forkserver is the parent's: unusable here


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)

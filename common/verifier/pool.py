"""The worker processes of the symbolic tier: one pebble ProcessPool of one worker per slot, kept for the
life of the process.

pebble does the process work: it times each job from when its worker takes it, on a thread of its own,
and past `timeout_s` stops that worker and starts a replacement; it notices a worker that died and
replaces it. It stops a worker with SIGTERM (SIGKILL 3 s later); our workers restore SIGTERM's default
action, for pebble's own handler is Python code that would wait for the interpreter (e.g. for sympy to
leave a C call). So the worker dies at once: the bound holds whichever thread calls and even inside C
code, and there is no `signal.alarm`. What is ours is the choice of worker for each job (`_run`): a gold's
jobs go to its home worker, which is why each worker is a pool of its own.

The workers are started on first use and kept, because a fresh worker is slow twice over: starting it
costs the sympy / math-verify imports, and ANTLR's Python runtime builds the parser's prediction DFA as
it meets new answer shapes (a first pass costs several times a warm one). They are forked from
multiprocessing's forkserver, which has imported sympy and math-verify and graded the warm-up set once
(its preload), so every worker, replacements after a timeout included, starts warm in milliseconds and
inherits nothing of the caller (threads, CUDA state). Each call is its own batch: a worker caches the
parses of the batch's golds (a gold is graded n times per prompt) and drops them when the next batch
comes; no results are kept between calls.

One call uses the workers at a time (a lock), so any thread may call `run_symbolic`. In a process forked
from the caller the workers are the parent's: that process drops its handles on them (never stops them)
and starts its own, spawned, which warm up before their first job, because multiprocessing's record of
the forkserver is the parent's too and cannot be used there. `shutdown()` runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import os
import signal
import threading
import zlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

from common import worker
from common.verifier.status import ERROR, TIMEOUT, Verdict, describe, error_verdict

# The forkserver imports these before it forks any worker; `warm` runs warm_up() on import.
_PRELOAD = ["common.verifier.symbolic", "math_verify", "sympy", "common.verifier.warm"]
MAX_CACHED_GOLDS = 512    # parsed golds a worker keeps within one batch
STALL_S = 120.0           # no job finished for this long beyond the time bound: the busy slots are stuck, restart them
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

class _Context:
    """The multiprocessing context pebble starts a slot's worker with; it remembers them, for worker_pids()."""

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


@dataclass
class _Slot:
    """One worker: a pebble pool of one process, so that a gold's jobs go to the worker that knows its shape."""
    pool: ProcessPool
    context: _Context

    @classmethod
    def start(cls) -> _Slot:
        context = _Context(_start_method)
        return cls(ProcessPool(max_workers=1, initializer=_start_worker, context=context), context)

    def stop(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=SHUTDOWN_WAIT_S)

    def pid(self) -> int | None:
        # Only exited ones go, and in place: pebble's thread may be appending (and starting) a replacement.
        for process in [p for p in self.context.processes if p.exitcode is not None]:
            self.context.processes.remove(process)
        return next((p.pid for p in self.context.processes if p.is_alive()), None)


_lock = threading.Lock()
_slots: list[_Slot] = []
_start_method = "forkserver"
_batches = itertools.count()


def _slot(index: int) -> _Slot:
    """Slot `index`, started on first use and started again after its pool broke (e.g. a worker killed while idle)."""
    while len(_slots) <= index:
        _slots.append(_Slot.start())
    if not _slots[index].pool.active:
        _slots[index].stop()
        _slots[index] = _Slot.start()
    return _slots[index]


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
    """symbolic_equal(pred, gold) for every job, in order, on `workers` workers.

    Always completes: timeout where a job ran past timeout_s (its worker is replaced), error where our
    code raised or the worker died. A job that never ran because its pool broke (pebble fails a pool whose
    worker died outside any job) runs once more in a fresh one.

    Jobs are grouped by gold and each gold has a home worker (a stable hash), which works through its
    groups one at a time: its parse of the gold is cached for the call, and a gold that comes back in a
    later call meets the parser that learned its shape (ANTLR's DFA is per process; without homes every
    worker must learn every shape, which cost about 2 ms more per response with 2 workers). A worker with
    nothing of its own left takes from the end of the busiest queue, so none idles.
    """
    if not jobs:
        return []
    with _lock:
        return _run(jobs, workers, timeout_s)


def _run(jobs: list[tuple[str, str]], workers: int, timeout_s: float) -> list[Verdict]:
    batch, size = next(_batches), min(workers, len(jobs))
    queues: list[deque[deque[int]]] = [deque() for _ in range(size)]
    by_gold: dict[str, deque[int]] = {}
    for index, (_, gold) in enumerate(jobs):
        if gold not in by_gold:
            by_gold[gold] = deque()
            queues[zlib.crc32(gold.encode()) % size].append(by_gold[gold])
        by_gold[gold].append(index)
    results: list[Verdict | None] = [None] * len(jobs)
    running: dict[Future, tuple[int, int]] = {}  # future -> (slot, job index)
    retried: set[int] = set()

    def assign(slot: int, index: int | None = None) -> None:
        if index is None:
            index = _next_job(queues, slot)
        if index is not None:
            future = _slot(slot).pool.schedule(grade_in_worker, args=(batch, *jobs[index]), timeout=timeout_s)
            running[future] = (slot, index)

    try:
        for slot in range(size):
            assign(slot)
        while running:
            done, _ = wait(running, timeout=STALL_S + timeout_s, return_when=FIRST_COMPLETED)
            if not done:  # every job is bounded, so a pool that finishes none is stuck: restart it
                for slot, index in running.values():
                    results[index] = Verdict(False, ERROR, f"no result in {STALL_S + timeout_s:.0f} s; worker restarted")
                    _slots[slot].stop()
                    _slots[slot] = _Slot.start()
                running.clear()
                break
            for future in done:
                slot, index = running.pop(future)
                if isinstance(future.exception(), BrokenProcessPool) and index not in retried:
                    retried.add(index)
                    assign(slot, index)  # _slot() starts a fresh pool
                    continue
                results[index] = _verdict(future)
                assign(slot)
    finally:
        for future in running:
            future.cancel()  # interrupted (e.g. KeyboardInterrupt): pebble stops the worker of a running job
    return [r if r is not None else Verdict(False, ERROR, "not graded: the pool was stuck") for r in results]


def _next_job(queues: list[deque[deque[int]]], slot: int) -> int | None:
    own = queues[slot]
    while own and not own[0]:
        own.popleft()
    if own:
        return own[0].popleft()
    busiest = max(queues, key=lambda queue: sum(map(len, queue)))
    while busiest and not busiest[-1]:
        busiest.pop()
    return busiest[-1].pop() if busiest else None


def _ready() -> None:
    """A job that does nothing: its result means the worker is up, warm, and taking jobs."""


def start(workers: int) -> None:
    """Start the first `workers` workers now rather than at the first answer that needs one (a resident
    score worker calls it while the controller starts, so the first iteration does not pay for it)."""
    with _lock:
        ready = [_slot(slot).pool.schedule(_ready) for slot in range(workers)]
    for future in ready:
        future.result()


def worker_pids() -> list[int]:
    """Process ids of the live workers, by slot (for tests and the benchmark's CPU accounting)."""
    with _lock:
        return [pid for pid in (slot.pid() for slot in _slots) if pid is not None]


def shutdown() -> None:
    """Stop every worker; the pool starts again on the next call."""
    got = _lock.acquire(timeout=SHUTDOWN_WAIT_S)  # at exit a daemon thread may still hold it mid-batch
    try:
        while _slots:
            _slots.pop().stop()
    finally:
        if got:
            _lock.release()


def _forget_after_fork() -> None:
    """In a child forked from the caller: the workers are the parent's, so drop the handles on them (never stop them)."""
    global _lock, _slots, _start_method
    _lock = threading.Lock()  # another thread may have held it at the fork
    _slots = []
    _start_method = "spawn"  # multiprocessing's record of the forkserver is the parent's: unusable here


atexit.register(shutdown)
# A worker process (common/worker.py) stops them when it ends: a multiprocessing child joins its live
# children before any atexit handler runs, and would wait for these forever.
worker.keep("verifier workers", shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)

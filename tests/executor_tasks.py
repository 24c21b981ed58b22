"""Tasks for tests/test_executors.py, imported by name in the executor's worker processes."""
import os
import signal
import time

from common import worker
from common.errors import ContractError


def pid() -> int:
    return os.getpid()


def add(a: int, b) -> int:
    return a + (b if isinstance(b, int) else b["value"])


def refuse() -> None:
    raise ContractError("the shard is altered\nsecond line")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash() -> None:
    return {}["missing"]


def keep_a_file(path: str) -> None:
    """Keep something open: closing it (at the process's end) writes `path`."""
    worker.keep("marker", lambda: open(path, "w").write(str(os.getpid())))


def wait_forever() -> None:
    while True:  # a rank waiting for a peer that died
        time.sleep(1)


def start_verifier() -> None:
    from common.verifier import start

    start(1)

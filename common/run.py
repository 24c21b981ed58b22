"""What every stage command and the controller do first: parse `--run DIR --iter I`, load the frozen run
config; and the processes they start (a free port, a child that dies with its parent). Imports no
model library: common/libraries.py quiets those, in the processes that load them."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

from common.config import Config, load_config
from common.errors import ConfigError

RUN_CONFIG = "run.yaml"


def stage_arguments(description: str) -> argparse.ArgumentParser:
    # `python -m stages.score` runs stages/score/__main__.py: show the command people type, not that file.
    prog = "python -m " + ".".join(Path(sys.argv[0]).resolve().parent.parts[-2:])
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder (holds run.yaml)")
    parser.add_argument("--iter", type=int, required=True, dest="iteration", help="iteration number")
    return parser


def load_run_config(run: Path) -> Config:
    path = Path(run) / RUN_CONFIG
    if not path.exists():
        raise ConfigError(f"{path} not found (fix: start the run with `make iterate RUN={Path(run).name}`)")
    return load_config(path)


def quiet_environment() -> None:
    """The libraries' quiet settings that are environment variables, inherited by every process this
    one starts; imports nothing (the controller calls it and stays free of torch)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def fail(message: str, code: int = 2, fix: str | None = None) -> None:
    """One line on stderr, `error: <what> (fix: <how>)`, and a non-zero exit."""
    print(f"error: {message}" + (f" (fix: {fix})" if fix else ""), file=sys.stderr)
    raise SystemExit(code)


def free_port() -> int:
    """A TCP port free on this machine now, for a torch.distributed rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exit_with_parent(parent_pid: int) -> None:
    """Exit at once (os._exit) when the process `parent_pid` is gone, e.g. killed with kill -9: a
    child of the controller must not outlive it, nor finish work into a run folder that another
    `make iterate` may be resuming. Polls from a daemon thread; call it first thing in the child."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="opd-watchdog").start()

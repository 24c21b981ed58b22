"""What every stage process does first: parse `--run DIR --iter I`, load the frozen run config."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import warnings
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


def quiet_libraries() -> None:
    """Library banners and progress bars off in stage output; warnings that matter and errors stay."""
    import torch

    quiet_environment()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, so DeepSpeed need not warn that it guessed
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # DeepSpeed's ZeRO-3 calls torch collectives that torch 2.13 marks deprecated, on every gather.
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)


def set_threads(config: Config) -> None:
    import torch

    if config.threads > 0:
        torch.set_num_threads(config.threads)


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

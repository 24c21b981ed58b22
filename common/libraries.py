"""What a process that loads models does first: quiet the model libraries and set torch's threads.

Worker-side only (stage tasks, benchmarks, reports): the controller never imports this module, so it
never imports torch (common/run.py has what it needs)."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from common.config import Config
from common.run import quiet_environment
from common.worker import frozen_config


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


def task_config(run: Path) -> Config:
    """What every stage task does first: the run's frozen config (a fresh copy), libraries quiet, threads set."""
    quiet_libraries()
    config = frozen_config(run)
    set_threads(config)
    return config

"""Helpers shared by the end-to-end tests and the fault-injection campaign (`make faults`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import shards
from common.shards import policy_version
from orchestrator.checks import check_run

ROOT = Path(__file__).resolve().parents[1]
# The one rule for ../shared (DAPO-Math-17k, the benchmarks, the public verifier cases): it sits beside
# the repository, and a test that reads it is skipped, saying so, on a clone without it.
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present (../shared sits "
                                  "beside the repository)")

# Two tiny iterations in about a minute on 2 cores: 8 prompts x 2 responses, 2 optimizer steps; shards
# of 4 rows, so that the rollouts and the eval have several shards to share between workers.
OVERRIDES = ["generate.prompts_per_iteration=8", "generate.n=2", "train.mini_batch_prompts=4",
             "train.micro_batch_size=8", "eval.every=1", "eval.prompts=16", "train.lr=1e-4",
             "generate.rows_per_shard=4"]


# The model libraries a process had imported when it exited, printed last by `orchestrate(..., imports=True)`.
HEAVY_LIBRARIES = ("torch", "transformers", "deepspeed", "vllm")
REPORT_IMPORTS = ("import atexit, runpy, sys; atexit.register(lambda: print('imported:', "
                  f"[m for m in {HEAVY_LIBRARIES!r} if m in sys.modules])); "
                  "sys.argv[0] = 'orchestrator'; runpy.run_module('orchestrator', run_name='__main__')")


def orchestrate(run: Path, iterations: int, *extra: str, fault: str | None = None,
                timeout: float | None = None, imports: bool = False) -> subprocess.CompletedProcess:
    """`python -m orchestrator iterate` on the tiny config; `fault` sets OPD_FAULT (common/faults.py);
    `imports` makes the controller print, as it exits, which of HEAVY_LIBRARIES it had imported."""
    launcher = ["-c", REPORT_IMPORTS] if imports else ["-m", "orchestrator"]
    command = [sys.executable, *launcher, "iterate", "--run", str(run), "--config", "configs/tiny.yaml",
               "-n", str(iterations), *[a for o in OVERRIDES for a in ("-o", o)], *extra]
    env = {k: v for k, v in os.environ.items() if k != "OPD_FAULT"}
    if fault:
        env["OPD_FAULT"] = fault
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def rollout_digests(run: Path, stages: tuple[str, ...] = ("rollouts",)) -> list[str]:
    return [f.sha256 for i in range(2) for stage in stages
            for f in shards.read_manifest(shards.stage_dir(run, i, stage)).files]


def assert_same_as_reference(run: Path, reference: Path) -> None:
    finished, problems = check_run(run)
    assert finished == 2 and problems == []
    assert rollout_digests(run, ("rollouts", "scored", "eval")) == rollout_digests(reference, ("rollouts", "scored", "eval"))
    for version in range(3):
        assert policy_version(shards.checkpoint_dir(run, version)) == policy_version(shards.checkpoint_dir(reference, version))


# What real checkpoints put in generation_config.json; none of it may shape on-policy sampling.
SHAPING_GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.8, "top_k": 3, "top_p": 0.5,
                             "temperature": 0.5, "min_p": 0.2}


def shaped_copy(checkpoint: str | Path, target: Path) -> Path:
    """A copy of `checkpoint` whose generation_config.json sets sampling options (SHAPING_GENERATION_CONFIG)."""
    import json
    import shutil

    shutil.copytree(checkpoint, target)
    config = json.loads((target / "generation_config.json").read_text())
    (target / "generation_config.json").write_text(json.dumps({**config, **SHAPING_GENERATION_CONFIG}, indent=1))
    return target

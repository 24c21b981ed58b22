"""The loop: iterate N times over generate -> score -> train, each stage in its own process.

Strictly on-policy: iteration i samples from checkpoint v_i and trains v_i into v_{i+1}; the trainer
checks it. Every stage output is sealed by a manifest, so a killed run resumes at the first stage
without one, and finished stages are skipped.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import shards
from common.config import Config, ConfigError, config_from_dict, save_config
from common.modeling import weights_sha256
from common.run import RUN_CONFIG
from orchestrator.tracking import Tracker

STAGES = ("generate", "score", "train")
STAGE_OUTPUT = {"generate": "rollouts", "score": "scored", "train": "train"}


class StageFailed(RuntimeError):
    pass


def prepare_run(run: Path, config: Config, force: bool) -> Config:
    """Freeze the config on first start; refuse to continue a run under a different config."""
    run.mkdir(parents=True, exist_ok=True)
    frozen = run / RUN_CONFIG
    if frozen.exists():
        previous = config_from_dict(yaml.safe_load(frozen.read_text()))
        if previous.hash() != config.hash():
            if not force:
                changed = _differences(previous.to_dict(), config.to_dict())
                raise ConfigError(f"run {run} was started with another config (changed: {', '.join(changed)}); "
                                  "use a new RUN=..., or FORCE=1 to continue under the new config")
            save_config(config, frozen)
    else:
        save_config(config, frozen)
    initial = shards.checkpoint_dir(run, 0)
    if not shards.checkpoint_ready(initial):
        staging = initial.with_name(".v0000.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(config.model.student, staging)
        (staging / shards.DONE).write_text(weights_sha256(staging) + "\n")
        shutil.rmtree(initial, ignore_errors=True)
        staging.rename(initial)
    return config


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def completed_iterations(run: Path) -> int:
    """Iterations 0..k-1 whose train stage finished (and whose produced checkpoint exists)."""
    k = 0
    while (shards.read_manifest(shards.stage_dir(run, k, "train")) is not None
           and shards.checkpoint_ready(shards.checkpoint_dir(run, k + 1))):
        k += 1
    return k


def run_stage(stage: str, run: Path, iteration: int, extra: tuple[str, ...] = ()) -> float:
    started = time.time()
    command = [sys.executable, "-m", f"stages.{stage}", "--run", str(run), "--iter", str(iteration), *extra]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise StageFailed(f"stage {stage} failed at iteration {iteration} with exit code {result.returncode} "
                          "(fix: see the stage's error above, then rerun the same command to resume)")
    return time.time() - started


def log_iteration(tracker: Tracker, run: Path, iteration: int, wall: dict[str, float]) -> None:
    for stage in ("rollouts", "scored", "train", "eval"):
        out_dir = shards.stage_dir(run, iteration, stage)
        manifest = shards.read_manifest(out_dir)
        if manifest is None:
            continue
        metrics = dict(manifest["metrics"])
        metrics[f"time/{stage}_stage_s"] = manifest["seconds"]
        for name, seconds in wall.items():
            if STAGE_OUTPUT.get(name) == stage:
                metrics[f"time/{name}_process_s"] = seconds
        tracker.log_stage(out_dir, metrics, iteration)


def evaluate_checkpoint(config: Config, run: Path, iteration: int, tracker: Tracker) -> None:
    if config.eval.every > 0 and shards.read_manifest(shards.stage_dir(run, iteration, "eval")) is None:
        run_stage("generate", run, iteration, ("--eval-only",))
    log_iteration(tracker, run, iteration, {})


def iterate(run: Path, config: Config, iterations: int, force: bool = False) -> None:
    prepare_run(run, config, force)
    tracker = Tracker(config, run)
    start = completed_iterations(run)
    print(f"run {run}: {start} iteration(s) done, running {iterations} more", flush=True)
    loop_started = time.time()
    try:
        for done, iteration in enumerate(range(start, start + iterations), start=1):
            began = time.time()
            wall = {stage: run_stage(stage, run, iteration) for stage in STAGES}
            log_iteration(tracker, run, iteration, wall)
            # ETA from the mean iteration so far; eval iterations make it a little optimistic.
            eta = (time.time() - loop_started) / done * (iterations - done)
            print(f"iteration {iteration} ({done}/{iterations}) done in {time.time() - began:.1f}s "
                  f"(generate {wall['generate']:.1f}s, score {wall['score']:.1f}s, train {wall['train']:.1f}s)"
                  + (f", ETA {eta / 60:.1f} min" if done < iterations else ""), flush=True)
        # The last checkpoint has not been sampled yet: evaluate it so every run ends with a figure.
        evaluate_checkpoint(config, run, start + iterations, tracker)
    finally:
        tracker.close()

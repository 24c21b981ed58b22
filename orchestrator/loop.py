"""The loop: iterate N times over generate -> score -> train.

Strictly on-policy: iteration i samples from checkpoint v_i and trains v_i into v_{i+1}; the trainer
checks it. Every stage output is sealed by a manifest, so a killed run resumes at the first stage
without one, and finished stages are skipped.

`orchestrator.mode: subprocess` runs each stage in its own process. `resident` keeps a Dask cluster
for the whole `iterate`: generate and score run as tasks on workers whose engines stay loaded
(common/cluster.py), and train still runs in its own process under DeepSpeed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import shards
from common.cluster import open_client
from common.config import Config, ConfigError, config_from_dict, save_config
from common.modeling import local_model_dir
from common.run import RUN_CONFIG, free_port, load_run_config
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
    if shards.checkpoint_ready(initial) and shards.read_manifest(shards.stage_dir(run, 0, "train")) is None:
        try:
            shards.verify_checkpoint(initial)
        except shards.ContractError as error:
            print(f"warning: {error}; copying the student again", file=sys.stderr, flush=True)
            shutil.rmtree(initial)
    if not shards.checkpoint_ready(initial):
        staging = initial.with_name(".v0000.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(local_model_dir(config.model.student), staging, ignore=shutil.ignore_patterns(".*"))
        shards.seal_checkpoint(staging)
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
    """Iterations 0..k-1 whose train stage finished (older checkpoints may be pruned; v_k may not).

    A missing or corrupt v_k means iteration k-1's training is redone: its inputs (v_{k-1} with its
    optimizer state, the scored shards) are kept until v_{k+1} exists.
    """
    k = 0
    while shards.read_manifest(shards.stage_dir(run, k, "train")) is not None:
        k += 1
    if k > 0:
        latest = shards.checkpoint_dir(run, k)
        try:
            shards.verify_checkpoint(latest)
        except shards.ContractError as error:
            print(f"warning: {error}; training iteration {k - 1} again", file=sys.stderr, flush=True)
            shards.reset_stage(shards.stage_dir(run, k - 1, "train"))
            shutil.rmtree(latest, ignore_errors=True)
            k -= 1
    return k


def epoch_limit(run: Path, config: Config) -> int | None:
    """The number of iterations `data.epochs` allows, once the prompt set is known (after iteration 0)."""
    meta = Path(run) / "prompts" / "train.json"
    if config.data.epochs == 0 or not meta.exists():
        return None
    rows = json.loads(meta.read_text())["rows"]
    return max(1, config.data.epochs * rows // config.generate.prompts_per_iteration)


def stage_command(stage: str, run: Path, iteration: int, processes: int = 1) -> list[str]:
    """`python -m stages.<stage> ...`, or the DeepSpeed launcher with one process per rank."""
    arguments = ["--run", str(run), "--iter", str(iteration)]
    if processes > 1:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--no_local_rank",
                "--master_port", str(free_port()), "--module", f"stages.{stage}", *arguments]
    return [sys.executable, "-m", f"stages.{stage}", *arguments]


def run_stage(stage: str, run: Path, iteration: int, extra: tuple[str, ...] = (), processes: int = 1) -> float:
    started = time.time()
    result = subprocess.run(stage_command(stage, run, iteration, processes) + list(extra))
    if result.returncode != 0:
        raise StageFailed(f"stage {stage} failed at iteration {iteration} with exit code {result.returncode} "
                          "(fix: see the stage's error above, then rerun the same command to resume)")
    return time.time() - started


def subprocess_stages(run: Path, config: Config):
    """Subprocess mode: every stage is `python -m stages.<stage>` (train under the DeepSpeed launcher)."""
    def runner(stage: str, iteration: int, extra: tuple[str, ...] = ()) -> float:
        return run_stage(stage, run, iteration, extra, config.train.processes if stage == "train" else 1)
    return runner


class ResidentStages:
    """Resident mode: generate and score as tasks on a Dask cluster that lives for the whole loop."""

    def __init__(self, client, run: Path, config: Config):
        self.client, self.run, self.config = client, run, config
        # Generation stays on one worker, so one engine follows the policy; score maps over all.
        self.generation_worker = sorted(client.scheduler_info()["workers"])[0]

    def __call__(self, stage: str, iteration: int, extra: tuple[str, ...] = ()) -> float:
        from stages.generate.__main__ import generate_on_worker
        from stages.score.__main__ import score_stage

        started = time.time()
        try:
            if stage == "generate":
                self.client.submit(generate_on_worker, self.run, iteration, "--eval-only" in extra,
                                   workers=[self.generation_worker], pure=False).result()
            elif stage == "score":
                score_stage(self.config, self.run, iteration, self.client)
            else:
                return run_stage(stage, self.run, iteration, extra, self.config.train.processes)
        except (ConfigError, shards.ContractError) as error:
            raise StageFailed(f"stage {stage} failed at iteration {iteration}: {error}") from error
        return time.time() - started


def log_iteration(tracker: Tracker, run: Path, iteration: int, wall: dict[str, float]) -> None:
    evals = sorted(p.name for p in shards.iteration_dir(run, iteration).glob("eval*"))
    for stage in ("rollouts", "scored", "train", *evals):
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


def evaluate_checkpoint(config: Config, run: Path, iteration: int, tracker: Tracker, stage_runner) -> None:
    if config.eval.every > 0 and shards.read_manifest(shards.stage_dir(run, iteration, "eval")) is None:
        stage_runner("generate", iteration, ("--eval-only",))
    log_iteration(tracker, run, iteration, {})


def evaluate_checkpoint_now(run: Path, version: int | None, k: int | None) -> None:
    """`make eval`: avg@k of checkpoint v_version (default: the latest) on the eval sets."""
    config = load_run_config(run)
    if version is None:
        version = completed_iterations(run)
    if not shards.checkpoint_ready(shards.checkpoint_dir(run, version)):
        raise ConfigError(f"checkpoint {shards.checkpoint_dir(run, version)} does not exist (pruned, or not trained)")
    run_stage("generate", run, version, ("--eval-only", *(("--eval-k", str(k)) if k else ())))
    tracker = Tracker(config, run)
    try:
        log_iteration(tracker, run, version, {})
    finally:
        tracker.close()


def iterate(run: Path, config: Config, iterations: int, force: bool = False) -> None:
    prepare_run(run, config, force)
    tracker = Tracker(config, run)
    start = completed_iterations(run)
    print(f"run {run}: {start} iteration(s) done, running {iterations} more", flush=True)
    loop_started = time.time()
    if config.orchestrator.mode == "resident":
        with open_client(config, processes=True) as client:
            _loop(run, config, iterations, tracker, start, loop_started, ResidentStages(client, run, config))
    else:
        _loop(run, config, iterations, tracker, start, loop_started, subprocess_stages(run, config))


def _loop(run: Path, config: Config, iterations: int, tracker: Tracker, start: int, loop_started: float,
          stage_runner) -> None:
    try:
        for iteration in range(start):  # metrics a crash kept from MLflow (stages without _LOGGED)
            log_iteration(tracker, run, iteration, {})
        for done, iteration in enumerate(range(start, start + iterations), start=1):
            limit = epoch_limit(run, config)
            if limit is not None and iteration >= limit:
                print(f"data.epochs={config.data.epochs} reached after {limit} iterations: stopping", flush=True)
                iterations = iteration - start
                break
            began = time.time()
            wall = {stage: stage_runner(stage, iteration) for stage in STAGES}
            log_iteration(tracker, run, iteration, wall)
            # ETA from the mean iteration so far; eval iterations make it a little optimistic.
            eta = (time.time() - loop_started) / done * (iterations - done)
            print(f"iteration {iteration} ({done}/{iterations}) done in {time.time() - began:.1f}s "
                  f"(generate {wall['generate']:.1f}s, score {wall['score']:.1f}s, train {wall['train']:.1f}s)"
                  + (f", ETA {eta / 60:.1f} min" if done < iterations else ""), flush=True)
        # The last checkpoint has not been sampled yet: evaluate it so every run ends with a figure.
        evaluate_checkpoint(config, run, start + iterations, tracker, stage_runner)
    finally:
        tracker.close()

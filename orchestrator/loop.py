"""The loop: iterate N times over generate -> score -> train.

Strictly on-policy: iteration i samples from checkpoint v_i and trains v_i into v_{i+1}; the trainer
checks it. Every stage output is sealed by a manifest, so a killed run resumes at the first stage
without one, and finished stages are skipped.

This process is the one controller, in both modes and with the same code: it plans every stage,
hands its shard tasks to an executor (common/executors.py) and seals every folder itself. Only the
executor differs: `orchestrator.mode: resident` keeps a Dask cluster for the whole `iterate`
(orchestrator/cluster.py, orchestrator/dask_executor.py) whose workers keep the generation engine,
the teachers and the DeepSpeed trainer loaded; `subprocess` runs each stage's tasks in fresh
processes of their own (LocalExecutor), nothing held between stages. Both write the same bytes.
The controller imports no model library (an import-linter contract in `make test`).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import metrics as m
from common import shards
from common.config import Config, save_config
from common.errors import ConfigError, ContractError, StageFailed
from common.executors import Executor, LocalExecutor
from common.faults import fault_point
from common.hub import local_model_dir
from common.run import RUN_CONFIG, exit_with_parent, load_run_config
from orchestrator.tracking import Tracker
from stages.generate.plan import RENDER, collect_generation, render_prompts, submit_generation
from stages.score.plan import collect_scoring, submit_scoring
from stages.train.records import Saving, collect_training, seal_training, submit_training

STAGE_OUTPUT = {"generate": "rollouts", "score": "scored", "train": "train"}


def resolve_shards(config: Config, previous: Config | None, generation_workers: int) -> Config:
    """`generate.shards: 0` means one shard per generation worker: resolved once, at the run's first
    start, and kept from then on (a run frozen before the key existed cut by rows only: 1)."""
    if config.generate.shards == 0:
        shards_then = previous.generate.shards if previous is not None else generation_workers
        config.generate.shards = shards_then or 1
    return config


def prepare_run(run: Path, config: Config, force: bool, generation_workers: int = 1) -> Config:
    """Freeze the config on first start (resolved: resolve_shards); refuse to continue a run under a
    config that computes something else (config.hash), unless forced. A change of how it runs only
    (mode, cluster, MLflow store, threads) is taken, and frozen, as is."""
    run.mkdir(parents=True, exist_ok=True)
    frozen = run / RUN_CONFIG
    previous = load_run_config(run) if frozen.exists() else None
    config = resolve_shards(config, previous, generation_workers)
    if previous is not None:
        if previous.hash() != config.hash() and not force:
            changed = _differences(previous.results_dict(), config.results_dict())
            raise ConfigError(f"run {run} was started with another config (changed: {', '.join(changed)}); "
                              "use a new RUN=..., or FORCE=1 to continue under the new config")
    save_config(config, frozen)
    initial = shards.checkpoint_dir(run, 0)
    if shards.checkpoint_ready(initial) and shards.read_manifest(shards.stage_dir(run, 0, "train")) is None:
        try:
            shards.verify_checkpoint(initial)
        except ContractError as error:
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
    k = shards.trained_iterations(run)
    if k > 0:
        latest = shards.checkpoint_dir(run, k)
        try:
            shards.verify_checkpoint(latest)
        except ContractError as error:
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


class Stages:
    """The stages of one run, driven on an executor (common/executors.py): each is planned here, its
    shard tasks run where the executor puts them, and every folder, the train stage's included, is
    sealed here once its shards are in. Scoring shard k waits for rollout shard k alone, so with
    resident workers it runs while sampling goes on; the train stage's folder is sealed once v_{i+1}'s
    optimizer state, written while iteration i+1 samples, is whole."""

    def __init__(self, executor: Executor, run: Path, config: Config):
        self.executor, self.run, self.config = executor, Path(run).resolve(), config  # workers may start elsewhere
        self.scoring: list | None = None  # the score tasks of the iteration in flight
        self.saving: Saving | None = None  # v_{i+1}'s optimizer state being written
        self.trusted: set[Path] = set()  # checkpoints whose writer's hashes this controller holds

    def generate(self, iteration: int, eval_only: bool = False, eval_k: int | None = None) -> float:
        began = time.time()
        trusted = shards.checkpoint_dir(self.run, iteration) in self.trusted
        sampling = submit_generation(self.executor, self.config, self.run, iteration, eval_only, eval_k, trusted)
        if not eval_only:
            # Scoring shard k waits for rollout shard k only (the whole iteration stays on v_i).
            self.scoring = submit_scoring(self.executor, self.config, self.run, iteration,
                                          sampling.rollouts if sampling else None)
        collect_generation(self.executor, self.config, self.run, iteration, sampling)
        self.seal_saved(wait=False)
        return time.time() - began

    def score(self, iteration: int) -> float:
        began = time.time()
        scoring, self.scoring = self.scoring, None
        collect_scoring(self.executor, self.config, self.run, iteration, scoring)
        self.seal_saved(wait=False)
        return time.time() - began

    def train(self, iteration: int) -> float:
        """Iteration i's steps and v_{i+1}'s policy on every rank; then their optimizer state is written
        (in the background on resident workers), sealed by seal_saved."""
        began = time.time()
        self.seal_saved(wait=True)  # v_i's state must be whole before its engine steps again
        ranks = submit_training(self.executor, self.config, self.run, iteration)
        saving = collect_training(self.executor, self.config, self.run, iteration, ranks)
        if saving is not None:
            self.trusted.add(Path(saving.policy.checkpoint))
            self.saving = saving
        return time.time() - began

    def evaluate(self, iteration: int, k: int | None = None) -> float:
        return self.generate(iteration, eval_only=True, eval_k=k)

    def seal_saved(self, wait: bool) -> None:
        """Seal iter=i/train/ once v_{i+1}'s optimizer state is written and DONE (if it is, or `wait`)."""
        if self.saving is None or not (wait or self.executor.done(self.saving.handles)):
            return
        saving, self.saving = self.saving, None
        seal_training(self.executor, self.config, self.run, saving)

    def finish(self, quiet: bool = False) -> None:
        """Wait for the last optimizer state and seal its iteration (quiet: after a failure elsewhere,
        as far as it goes; the next run redoes what is not sealed)."""
        try:
            self.seal_saved(wait=True)
        except Exception:
            if not quiet:
                raise


def check_length_health(config: Config, run: Path, iteration: int) -> None:
    """health.max_truncated_fraction: warn, or stop before training, when too many of the iteration's
    rollouts were cut at the length limit."""
    manifest = shards.read_manifest(shards.stage_dir(run, iteration, "rollouts"))
    h = config.health
    cut = manifest.metrics.get(m.TRUNCATED_FRACTION, 0.0) if manifest else 0.0
    if cut <= h.max_truncated_fraction:
        return
    what = (f"iteration {iteration}: {cut:.0%} of the rollouts were cut at generate.max_response_tokens="
            f"{config.generate.max_response_tokens} (health.max_truncated_fraction {h.max_truncated_fraction:.0%}), "
            "the first sign of a length collapse")
    if h.on_truncation == "stop":
        raise StageFailed(f"{what}; stopped before training on them (fix: look at them with `make inspect "
                          f"ITER={iteration}`, then rerun with health.on_truncation=warn to go on)")
    print(f"warning: {what}", file=sys.stderr, flush=True)


def log_iteration(tracker: Tracker, run: Path, iteration: int, wall: dict[str, float]) -> None:
    evals = sorted(p.name for p in shards.iteration_dir(run, iteration).glob("eval*"))
    for stage in ("rollouts", "scored", "train", *evals):
        out_dir = shards.stage_dir(run, iteration, stage)
        manifest = shards.read_manifest(out_dir)
        if manifest is None:
            continue
        metrics = dict(manifest.metrics)
        metrics[m.stage_seconds(stage)] = manifest.seconds
        for name, seconds in wall.items():
            if STAGE_OUTPUT.get(name) == stage:
                metrics[m.wall_seconds(name)] = seconds  # as the controller waited for it, start-up included
        tracker.log_stage(out_dir, metrics, iteration)


def evaluate_checkpoint(config: Config, run: Path, iteration: int, tracker: Tracker, stages: Stages) -> None:
    if config.eval.every > 0 and shards.read_manifest(shards.stage_dir(run, iteration, "eval")) is None:
        stages.evaluate(iteration)
    log_iteration(tracker, run, iteration, {})


def evaluate_checkpoint_now(run: Path, version: int | None, k: int | None) -> None:
    """`make eval`: avg@k of checkpoint v_version (default: the latest) on the eval sets."""
    config = load_run_config(run)
    if version is None:
        version = completed_iterations(run)
    if not shards.policy_ready(shards.checkpoint_dir(run, version)):
        raise ConfigError(f"checkpoint {shards.checkpoint_dir(run, version)} does not exist (pruned, or not trained)")
    with LocalExecutor() as executor:
        render_prompts(executor, run, version)
        Stages(executor, run, config).evaluate(version, k)
    with Tracker(config, run) as tracker:
        log_iteration(tracker, run, version, {})


def iterate(run: Path, config: Config, iterations: int, force: bool = False) -> None:
    """The start overlaps: the prompt sets render in a process of their own (the chat template over
    every prompt, after importing transformers: ~4 s of import, then 2-3 s for DAPO-Math-17k with
    Qwen3's template, docs/recipe.md), the cluster's workers open their models in theirs, and MLflow
    opens here. So this process, the one controller, never imports torch or transformers. The same
    loop drives both modes; only the executor differs. In resident mode the cluster opens first: the run's shard count
    follows its generation workers (resolve_shards)."""
    if config.orchestrator.mode == "resident":
        from orchestrator.cluster import generation_workers, open_cluster
        from orchestrator.dask_executor import DaskExecutor

        with open_cluster(config) as client:
            config = prepare_run(run, config, force, generation_workers(client))
            executor = DaskExecutor(client)
            stages = Stages(executor, run, config)
            try:
                _start(run, config, iterations, stages,
                       opened=lambda start: executor.open_models(stages.run, start, config.train.processes))
            finally:
                stages.finish(quiet=True)  # a failure elsewhere: seal what the trainer finished writing
                executor.close()
    else:
        config = prepare_run(run, config, force)
        with LocalExecutor() as executor:
            _start(run, config, iterations, Stages(executor, run, config))


def _start(run: Path, config: Config, iterations: int, stages: Stages, opened=None) -> None:
    start = completed_iterations(run)
    # Its process exits with this one: a controller killed while it renders leaves nothing behind.
    renderer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                                   initargs=(os.getpid(),))
    try:
        rendered = renderer.submit(RENDER, Path(run).resolve(), start)
        if opened is not None:
            opened(start)

        def prompts_ready() -> None:
            rendered.result()
            fault_point("rendered")
            renderer.shutdown()  # its process holds transformers' memory: gone before the first iteration

        with Tracker(config, run) as tracker:
            print(f"run {run}: {start} iteration(s) done, running {iterations} more", flush=True)
            prompts_ready()
            _loop(run, config, iterations, tracker, start, time.time(), stages)
    finally:
        renderer.shutdown(cancel_futures=True)


def _loop(run: Path, config: Config, iterations: int, tracker: Tracker, start: int, loop_started: float,
          stages: Stages) -> None:
    for iteration in range(start):  # metrics a crash kept from MLflow (stages without _LOGGED)
        log_iteration(tracker, run, iteration, {})
    walls: dict[int, dict[str, float]] = {}
    for done, iteration in enumerate(range(start, start + iterations), start=1):
        limit = epoch_limit(run, config)
        if limit is not None and iteration >= limit:
            print(f"data.epochs={config.data.epochs} reached after {limit} iterations: stopping", flush=True)
            iterations = iteration - start
            break
        began = time.time()
        wall = walls[iteration] = {"generate": stages.generate(iteration)}
        check_length_health(config, run, iteration)
        wall.update(score=stages.score(iteration), train=stages.train(iteration))
        log_iteration(tracker, run, iteration, wall)
        if iteration - 1 in walls:  # its train folder was sealed during this iteration
            log_iteration(tracker, run, iteration - 1, walls[iteration - 1])
        # ETA from the mean iteration so far; eval iterations make it a little optimistic.
        eta = (time.time() - loop_started) / done * (iterations - done)
        print(f"iteration {iteration} ({done}/{iterations}) done in {time.time() - began:.1f}s "
              f"(generate {wall['generate']:.1f}s, score {wall['score']:.1f}s, train {wall['train']:.1f}s)"
              + (f", ETA {eta / 60:.1f} min" if done < iterations else ""), flush=True)
    # The last checkpoint has not been sampled yet: evaluate it so every run ends with a figure (on
    # resident workers while its optimizer state is written).
    evaluate_checkpoint(config, run, start + iterations, tracker, stages)
    stages.finish()
    last = start + iterations - 1
    if last in walls:
        log_iteration(tracker, run, last, walls[last])

"""The loop: iterate N times over generate -> score -> train.

Strictly on-policy: iteration i samples from checkpoint v_i and trains v_i into v_{i+1}; the trainer
checks it. Every stage output is sealed by a manifest, so a killed run resumes at the first stage
without one, and finished stages are skipped.

`orchestrator.mode: resident` keeps a Dask cluster for the whole `iterate` (orchestrator/cluster.py):
this process is the one controller, sending the stages' shard jobs to workers that keep the
generation engine, the teacher and the DeepSpeed trainer loaded (orchestrator/roles.py) and sealing
every folder itself. `subprocess` runs each stage in its own process (for running or debugging one
stage alone). Both write the same bytes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import shards
from common.config import Config, save_config
from common.errors import ConfigError, ContractError, NonFiniteError, StageFailed, StalePolicyError, WeightSyncError
from common.faults import fault_point
from common.hub import local_model_dir
from common.run import RUN_CONFIG, exit_with_parent, free_port, load_run_config
from orchestrator.tracking import Tracker

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


class SubprocessStages:
    """`orchestrator.mode: subprocess`: every stage a fresh `python -m stages.<stage>` (train under the
    DeepSpeed launcher with train.processes ranks); nothing is held between stages."""

    def __init__(self, run: Path, config: Config):
        self.run, self.config = run, config

    def generate(self, iteration: int) -> float:
        return run_stage("generate", self.run, iteration)

    def score(self, iteration: int) -> float:
        return run_stage("score", self.run, iteration)

    def train(self, iteration: int) -> float:
        return run_stage("train", self.run, iteration, processes=self.config.train.processes)

    def evaluate(self, iteration: int, k: int | None = None) -> float:
        return run_stage("generate", self.run, iteration, ("--eval-only", *(("--eval-k", str(k)) if k else ())))

    def finish(self, quiet: bool = False) -> None:
        """Nothing outlives a stage process."""


class ResidentStages:
    """`orchestrator.mode: resident`: the stages' shard jobs as Dask tasks on workers that keep their
    models loaded (orchestrator/roles.py). Shards go to whichever `generate` / `score` worker is free;
    a rollout shard is scored as soon as it is written; rank r trains on its `train-rank-r` worker.
    Every folder is sealed here, by the controller, once all its shards are in; the train stage's
    once v_{i+1}'s optimizer state, written while iteration i+1 samples, is sealed too."""

    def __init__(self, client, run: Path, config: Config):
        from stages.score.scoring import teacher_versions

        self.client, self.run, self.config = client, Path(run).resolve(), config  # workers may start elsewhere
        self.teacher_versions = teacher_versions(config)
        self.scoring: list | None = None  # the score futures of the iteration in flight
        self.address = None  # the trainers' rendezvous (host:port, a future until known), fixed for the cluster's life
        self.opening: list = []  # open_models tasks, waited for before the first stage's
        self.trusted: set[Path] = set()  # checkpoints whose writer's hashes this controller holds
        self.saving: tuple | None = None  # (PolicyWritten, futures) of the optimizer state being written

    def _wait(self, stage: str, iteration: int, futures: list) -> list:
        """The tasks' results; a failure a user can act on (a lost worker, bad data, a failed gate, a
        NaN) stops the stage with one line. Anything else is a bug and keeps its traceback."""
        from distributed import KilledWorker

        try:
            return self.client.gather(futures)
        except (KilledWorker, ConfigError, ContractError, WeightSyncError, NonFiniteError,
                StalePolicyError) as error:
            self.client.cancel(futures)
            what = "a worker died" if isinstance(error, KilledWorker) else str(error).splitlines()[0]
            step = "opening the workers' models" if stage == "open" else f"stage {stage}"
            raise StageFailed(f"{step} failed at iteration {iteration}: {what} "
                              "(fix: rerun the same command to resume)") from error

    def _submit(self, task, *args, role: str) -> object:
        return self.client.submit(task, self.run, *args, resources={role: 1}, pure=False)

    def open_models(self, iteration: int) -> None:
        """Every worker opens what its roles need at v_i now, in its own process (orchestrator/roles.py):
        first its generation engine, teachers and verifier workers, then, once all of those are open, the
        training ranks, all at once."""
        from common.devices import train_role
        from orchestrator.roles import GENERATE, SCORE, open_models_task, open_rank_task, rendezvous_address

        world = self.config.train.processes
        workers = {address: info.get("resources", {})
                   for address, info in self.client.scheduler_info(n_workers=-1)["workers"].items()}
        models = [self.client.submit(open_models_task, self.run, iteration, GENERATE in roles, SCORE in roles,
                                     workers=[address], pure=False)
                  for address, roles in workers.items() if GENERATE in roles or SCORE in roles]
        # The ranks' meeting point, picked on rank 0's worker once the models are open; a future until train().
        self.address = self.client.submit(rendezvous_address, *models, resources={train_role(0): 1}, pure=False)
        ranks = [self._submit(open_rank_task, iteration, rank, world, self.address, role=train_role(rank))
                 for rank in range(world)]
        self.opening = models + ranks

    def _generate(self, iteration: int, eval_only: bool = False, eval_k: int | None = None) -> float:
        from orchestrator.roles import GENERATE, SCORE, sample_task, score_task
        from stages.generate.stage import plan_generation, seal_plan
        from stages.score.scoring import sealed_rollouts, start_scoring

        began = time.time()
        if self.opening:
            self._wait("open", iteration, self.opening)
            self.opening = []
        checkpoint = shards.checkpoint_dir(self.run, iteration)
        plan = plan_generation(self.config, self.run, iteration, eval_only, eval_k, trusted=checkpoint in self.trusted)
        evals = [self._submit(sample_task, iteration, job, role=GENERATE) for job in (plan.eval_jobs if plan else [])]
        rollouts = [self._submit(sample_task, iteration, job, role=GENERATE)
                    for job in (plan.rollout_jobs if plan else [])]
        if not eval_only and start_scoring(self.config, self.run, iteration):
            # Scoring shard k waits for rollout shard k only (the whole iteration stays on v_i).
            sources = rollouts if rollouts else sealed_rollouts(self.run, iteration)
            self.scoring = [self._submit(score_task, iteration, source, self.teacher_versions, role=SCORE)
                            for source in sources]
        if plan is not None:
            eval_done = self._wait("generate", iteration, evals)
            rollouts_done = self._wait("generate", iteration, rollouts)
            gate = max((d.gate for d in eval_done + rollouts_done),
                       key=lambda g: g.get("generate/weight_sync_gap_mean", 0.0), default={})
            seal_plan(self.config, self.run, iteration, plan, eval_done, began, rollouts_done,
                      min((d.started for d in rollouts_done), default=began), gate)
        self.seal_saved(wait=False)
        return time.time() - began

    def generate(self, iteration: int) -> float:
        return self._generate(iteration)

    def score(self, iteration: int) -> float:
        from stages.score.scoring import seal_scored

        if self.scoring is None:
            return 0.0
        began = time.time()
        futures = self.scoring
        self.scoring = None
        done = self._wait("score", iteration, futures)
        # The stage's clock starts with its first shard, not when its tasks were queued behind sampling.
        seal_scored(self.config, self.run, iteration, done, min(d.started for d in done), self.teacher_versions,
                    len({d.worker for d in done}))
        self.seal_saved(wait=False)
        return time.time() - began

    def train(self, iteration: int) -> float:
        """Iteration i's steps and v_{i+1}'s policy on every rank; then their optimizer state is
        written in the background (a seceded task per rank), sealed by seal_saved."""
        from common.devices import train_role
        from orchestrator.roles import optimizer_state_task, rendezvous_address, train_task
        from stages.train.records import announce

        began = time.time()
        self.seal_saved(wait=True)  # v_i's state must be whole before its engine steps again
        world = self.config.train.processes
        if self.address is None:
            self.address = self.client.submit(rendezvous_address, resources={train_role(0): 1}, pure=False)
        if not isinstance(self.address, str):
            self.address = self.address.result()
        ranks = [self._submit(train_task, iteration, rank, world, self.address, role=train_role(rank))
                 for rank in range(world)]
        policy = self._wait("train", iteration, ranks)[0]
        if policy is not None:
            announce(policy)
            self.trusted.add(Path(policy.checkpoint))
            saves = [self._submit(optimizer_state_task, iteration, rank, policy.policy_files if rank == 0 else None,
                                  role=train_role(rank)) for rank in range(world)]
            self.saving = (policy, saves)
        return time.time() - began

    def seal_saved(self, wait: bool) -> None:
        """Seal iter=i/train/ once v_{i+1}'s optimizer state is written and DONE (if it is, or `wait`)."""
        from stages.train.records import seal_train

        if self.saving is None:
            return
        policy, futures = self.saving
        if not wait and not all(future.done() for future in futures):
            return
        self.saving = None
        state = self._wait("train", policy.iteration, futures)[0]
        seal_train(self.config, self.run, policy, state)

    def finish(self, quiet: bool = False) -> None:
        """Wait for the last optimizer state and seal its iteration (quiet: after a failure elsewhere,
        as far as it goes; the next run redoes what is not sealed)."""
        try:
            if self.opening:  # never needed (no iteration ran): still let them end before the workers close
                from distributed import wait

                wait(self.opening)
                self.opening = []
            self.seal_saved(wait=True)
        except Exception:
            if not quiet:
                raise

    def evaluate(self, iteration: int, k: int | None = None) -> float:
        return self._generate(iteration, eval_only=True, eval_k=k)


def check_length_health(config: Config, run: Path, iteration: int) -> None:
    """health.max_truncated_fraction: warn, or stop before training, when too many of the iteration's
    rollouts were cut at the length limit."""
    manifest = shards.read_manifest(shards.stage_dir(run, iteration, "rollouts"))
    h = config.health
    cut = manifest["metrics"].get("generate/truncated_fraction", 0.0) if manifest else 0.0
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
        metrics = dict(manifest["metrics"])
        metrics[f"time/{stage}_stage_s"] = manifest["seconds"]
        for name, seconds in wall.items():
            if STAGE_OUTPUT.get(name) == stage:
                metrics[f"time/{name}_wall_s"] = seconds  # as the controller waited for it, start-up included
        tracker.log_stage(out_dir, metrics, iteration)


def evaluate_checkpoint(config: Config, run: Path, iteration: int, tracker: Tracker, stages) -> None:
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
    SubprocessStages(run, config).evaluate(version, k)
    with Tracker(config, run) as tracker:
        log_iteration(tracker, run, version, {})


def iterate(run: Path, config: Config, iterations: int, force: bool = False) -> None:
    """The start overlaps: the prompt sets render in a process of their own (the chat template over
    every prompt, after importing transformers: seconds here, minutes for DAPO-Math with Qwen3's
    template), the cluster's workers open their models in theirs, and MLflow opens here. So this
    process, the one controller, never imports torch or transformers. In resident mode the cluster
    opens first: the run's shard count follows its generation workers (resolve_shards)."""
    if config.orchestrator.mode == "resident":
        from orchestrator.cluster import generation_workers, open_cluster

        with open_cluster(config) as client:
            config = prepare_run(run, config, force, generation_workers(client))
            stages = ResidentStages(client, run, config)
            try:
                _start(run, config, iterations, stages, opened=stages.open_models)
            finally:
                stages.finish(quiet=True)  # a failure elsewhere: seal what the trainer finished writing
    else:
        config = prepare_run(run, config, force)
        _start(run, config, iterations, SubprocessStages(run, config))


def _start(run: Path, config: Config, iterations: int, stages, opened=None) -> None:
    from stages.generate.jobs import render_prompt_sets

    start = completed_iterations(run)
    # Its process exits with this one: a controller killed while it renders leaves nothing behind.
    renderer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                                   initargs=(os.getpid(),))
    try:
        rendered = renderer.submit(render_prompt_sets, config, run, shards.checkpoint_dir(run, start))
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
          stages) -> None:
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
        if iteration - 1 in walls:  # resident: its train folder was sealed during this iteration
            log_iteration(tracker, run, iteration - 1, walls[iteration - 1])
        # ETA from the mean iteration so far; eval iterations make it a little optimistic.
        eta = (time.time() - loop_started) / done * (iterations - done)
        print(f"iteration {iteration} ({done}/{iterations}) done in {time.time() - began:.1f}s "
              f"(generate {wall['generate']:.1f}s, score {wall['score']:.1f}s, train {wall['train']:.1f}s)"
              + (f", ETA {eta / 60:.1f} min" if done < iterations else ""), flush=True)
    # The last checkpoint has not been sampled yet: evaluate it so every run ends with a figure (in
    # resident mode while its optimizer state is written).
    evaluate_checkpoint(config, run, start + iterations, tracker, stages)
    stages.finish()
    last = start + iterations - 1
    if last in walls:
        log_iteration(tracker, run, last, walls[last])

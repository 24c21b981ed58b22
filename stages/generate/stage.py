"""The generate stage of iteration i: evaluate v_i when due, sample iteration i's rollouts.

`plan_generation` says what is left to do (finished outputs are skipped) as shard jobs;
`generate_stage` runs them one after the other on one engine (a stage process, `python -m
stages.generate`); in resident mode the orchestrator hands the same jobs to its generation workers
(orchestrator/roles.py). Both seal the same folders with the same bytes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import shards
from common.config import Config
from common.shards import policy_version
from stages.generate.gate import check_weight_sync
from stages.generate.jobs import (
    SampledShard,
    ShardJob,
    eval_folder,
    eval_jobs,
    rollout_jobs,
    run_job,
    seal_eval,
    seal_rollouts,
    train_prompts,
)
from stages.generate.sampling import GenerationEngine


def eval_due(config: Config, iteration: int) -> bool:
    return config.eval.every > 0 and iteration % config.eval.every == 0


@dataclass
class GenerationPlan:
    """What iteration i's generate stage still has to write."""
    checkpoint: Path
    version: str
    k: int
    eval_folder: str
    eval_jobs: list[ShardJob] = field(default_factory=list)
    rollout_jobs: list[ShardJob] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # train prompts dropped at ingestion, by reason
    verify_seconds: float = 0.0  # checking v_i's policy files against their seal


def discard_stale(run: Path, iteration: int, version: str, folders: tuple[str, ...]) -> None:
    """Remove sealed outputs of iteration i sampled by another v_i than the one on disk now (v_i was
    trained again after a crash, and training is not bitwise reproducible on every device), with the
    scored shards made from stale rollouts."""
    for folder in folders:
        manifest = shards.read_manifest(shards.stage_dir(run, iteration, folder))
        if manifest is not None and manifest.get("policy_version", version) != version:
            print(f"warning: iter={iteration:04d}/{folder} was sampled by {manifest['policy_version']}, not "
                  f"{version}; sampling it again", flush=True)
            shards.reset_stage(shards.stage_dir(run, iteration, folder))
            if folder == "rollouts":
                shards.reset_stage(shards.stage_dir(run, iteration, "scored"))


def plan_generation(config: Config, run: Path, iteration: int, eval_only: bool = False,
                    eval_k: int | None = None, trusted: bool = False) -> GenerationPlan | None:
    """The jobs left for iteration i (None when nothing is), after clearing unsealed or stale outputs.
    Raises ContractError when v_i's policy is missing or altered; `trusted`: its writer's hashes
    were handed to this process in this run, so only the files' sizes are checked."""
    checkpoint = shards.checkpoint_dir(run, iteration)
    verify_started = time.time()
    shards.verify_policy(checkpoint, trusted)
    verify_seconds = time.time() - verify_started
    version = policy_version(checkpoint)
    folder = eval_folder(config, eval_k)
    discard_stale(run, iteration, version, (folder, "rollouts"))
    want_eval = (eval_only or eval_due(config, iteration)) and not shards.stage_finished(
        shards.stage_dir(run, iteration, folder))
    want_rollouts = not eval_only and not shards.stage_finished(shards.stage_dir(run, iteration, "rollouts"))
    if not (want_eval or want_rollouts):
        return None
    plan = GenerationPlan(checkpoint, version, eval_k or config.eval.k, folder, verify_seconds=verify_seconds)
    # v_i's tokenizer renders the prompt sets, once per run (then they are read from the run folder).
    if want_eval:
        shards.reset_stage(shards.stage_dir(run, iteration, folder))
        plan.eval_jobs = eval_jobs(config, run, checkpoint, eval_k)
    if want_rollouts:
        shards.reset_stage(shards.stage_dir(run, iteration, "rollouts"))
        plan.rollout_jobs = rollout_jobs(config, run, iteration, checkpoint)
        plan.dropped = train_prompts(config, run, checkpoint).dropped
    return plan


def seal_plan(config: Config, run: Path, iteration: int, plan: GenerationPlan, eval_done: list[SampledShard],
              eval_started: float, rollouts_done: list[SampledShard], rollouts_started: float, gate: dict) -> None:
    if plan.eval_jobs:
        seal_eval(config, run, iteration, plan.eval_folder, sorted(eval_done, key=lambda d: d.index),
                  eval_started, plan.version, plan.k)
    if plan.rollout_jobs:
        seal_rollouts(config, run, iteration, sorted(rollouts_done, key=lambda d: d.index), rollouts_started,
                      plan.version, plan.dropped, {"generate/verify_seconds": plan.verify_seconds, **gate})


def generate_stage(config: Config, run: Path, iteration: int, engine_for: Callable[[Path], GenerationEngine],
                   eval_only: bool = False, eval_k: int | None = None) -> GenerationEngine | None:
    """Every job of the plan on one engine, in order. `engine_for(checkpoint)` returns an engine
    holding that policy; it is gated (stages/generate/gate.py) before it samples anything."""
    plan = plan_generation(config, run, iteration, eval_only, eval_k)
    if plan is None:
        return None
    engine = engine_for(plan.checkpoint)
    gate = check_weight_sync(engine, plan.checkpoint)
    eval_started = time.time()
    eval_done = [run_job(config, run, iteration, job, engine, plan.version) for job in plan.eval_jobs]
    rollouts_started = time.time()
    rollouts_done = [run_job(config, run, iteration, job, engine, plan.version) for job in plan.rollout_jobs]
    seal_plan(config, run, iteration, plan, eval_done, eval_started, rollouts_done, rollouts_started, gate)
    return engine

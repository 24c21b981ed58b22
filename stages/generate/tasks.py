"""The generate stage's tasks, run by a worker (common/executors.py): a local stage process or a
resident Dask worker. The worker keeps one generation engine open (common/worker.py), pointed at
each new policy in place and gated against the trainer's probe (stages/generate/gate.py) before it
samples anything.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common import shards, worker
from common.config import Config
from common.libraries import task_config
from common.shards import policy_version
from common.verifier import start as start_verifier
from stages.generate.engines import open_engine
from stages.generate.gate import check_weight_sync
from stages.generate.jobs import render_prompt_sets, run_job
from stages.generate.plan import SampledShard, ShardJob
from stages.generate.sampling import GenerationEngine

_engine: GenerationEngine | None = None
_gate: dict[str, float] = {}  # the weight-sync gap of the policy the engine holds
_gated: Path | None = None  # the checkpoint whose gate the engine passed


def engine_at(config: Config, checkpoint: Path) -> GenerationEngine:
    """The kept engine holding `checkpoint`: opened on first use, then reloaded in place; checked
    against the checkpoint's weight-sync probe whenever it takes a new policy, and again by every task
    until that check passes (an engine that failed it samples nothing)."""
    global _engine, _gate, _gated
    if _engine is None:
        _engine = open_engine(config, checkpoint)
        worker.keep("generation engine", close, sleep)
    elif _engine.checkpoint != Path(checkpoint):
        _engine.load_policy(checkpoint)
    if _gated != Path(checkpoint):
        _gate = check_weight_sync(_engine, checkpoint)
        _gated = Path(checkpoint)
    return _engine


def close() -> None:
    global _engine, _gated
    if _engine is not None:
        _engine.close()
    _engine, _gated = None, None


def sleep() -> None:
    """Free the kept engine's GPU memory while a training rank beside it steps (a no-op on a CPU)."""
    if _engine is not None:
        _engine.sleep()


def sample_task(run: Path, iteration: int, job: ShardJob) -> SampledShard:
    """One generate-stage shard (rollouts or eval) on this worker's engine, holding v_i."""
    config = task_config(run)
    checkpoint = shards.checkpoint_dir(run, iteration)
    engine = engine_at(config, checkpoint)
    return replace(run_job(config, run, iteration, job, engine, policy_version(checkpoint)), gate=_gate,
                   worker=worker.NAME)


def open_task(run: Path, iteration: int) -> None:
    """Open the engine at v_i (gated) and the verifier's workers (eval shards are graded here) ahead of
    the first iteration: a resident worker does it while the controller starts."""
    config = task_config(run)
    engine_at(config, shards.checkpoint_dir(run, iteration))
    start_verifier(config.score.verifier_workers)


def render_task(run: Path, iteration: int) -> None:
    """Render the run's prompt sets with v_i's tokenizer (stages/generate/jobs.py: render_prompt_sets)."""
    render_prompt_sets(task_config(run), run, shards.checkpoint_dir(run, iteration))

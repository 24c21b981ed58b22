"""One run of this pipeline, and its figures read from the run's own stage manifests."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.peers.measure import ROOT, run_measured
from common import shards
from common.config import load_config

CONFIG = ROOT / "configs" / "tiny.yaml"
STUDENT = ROOT / "assets" / "tiny" / "student"


def step_batch_overrides() -> list[str]:
    """Sampling and the teacher forward in batches of one optimizer step's sequences, as TRL's trainer runs
    them (it generates and scores per step): 64 here, where configs/tiny.yaml says 256 and 128."""
    config = load_config(CONFIG)
    batch = config.train.mini_batch_prompts * config.generate.n
    return [f"generate.batch_size={batch}", f"score.batch_size={batch}"]


def pipeline_command(run: Path, iterations: int, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config",
               str(CONFIG.relative_to(ROOT)), "-n", str(iterations)]
    for override in ["eval.every=0", *step_batch_overrides(), *overrides]:
        command += ["-o", override]
    return command


def iteration_figures(run: Path, iteration: int) -> dict:
    """Per phase: its own work (seconds, tokens) and its stage's wall time, from the manifests."""
    rollouts, scored, train = (shards.read_manifest(shards.stage_dir(run, iteration, stage))
                               for stage in ("rollouts", "scored", "train"))
    g, s, t = rollouts.metrics, scored.metrics, train.metrics
    return {
        "generate": {"seconds": g["generate/sample_seconds"], "tokens": g["generate/response_tokens"],
                     "stage_s": rollouts.seconds},
        "teacher": {"seconds": s["score/teacher_forward_s"], "tokens": s["score/forward_tokens"],
                    "stage_s": scored.seconds},
        "train": {"seconds": t["train/step_seconds"], "tokens": t["train/response_tokens"],
                  "stage_s": train.seconds, "setup_s": t["train/setup_seconds"]},
    }


def pipeline_run(name: str, run: Path, iterations: int, time_cap_s: float, overrides: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    command = pipeline_command(run, iterations, overrides)
    measured = run_measured(command, run.parent / f"{run.name}.log", time_cap_s, {"OPD_PROGRESS": "0"})
    checkpoints = [{"version": 0, "samples": 0, "seconds": 0.0, "path": str(STUDENT)}]
    per_iteration = []
    samples = 0
    for iteration in range(iterations):
        train = shards.read_manifest(shards.stage_dir(run, iteration, "train"))
        if train is None:
            break  # stopped by the time cap
        per_iteration.append(iteration_figures(run, iteration))
        samples += shards.read_manifest(shards.stage_dir(run, iteration, "rollouts")).rows
        checkpoints.append({"version": iteration + 1, "samples": samples,
                            "seconds": train.finished_at - measured["launch"],
                            "path": str(shards.checkpoint_dir(run, iteration + 1))})
    return {"system": name, "command": " ".join(command), **measured, "checkpoints": checkpoints,
            "per_iteration": per_iteration}

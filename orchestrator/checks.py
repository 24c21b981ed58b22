"""`python -m orchestrator check --run runs/x`: verify a run folder's invariants, list what is wrong.

What a finished iteration i promises, and what the fault-injection tests check after every crash:
- its rollout and scored shards match their manifests' sha256, with exactly prompts x n rows and no
  duplicate (prompt_id, sample_idx);
- every row carries policy v_i, the version the train stage started from, and the train manifest's
  produced version is the one v_{i+1} holds (strictly on-policy, nothing trained twice);
- every checkpoint still present matches the sha256 of each file in its DONE;
- the MLflow run holds exactly one point per iteration for each stage metric (when the run is tracked:
  `iterate` tracks it; the stage CLIs alone do not).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.compute as pc

from common import shards
from common.errors import ContractError
from common.run import load_run_config
from common.shards import policy_version


def _check_iteration(run: Path, iteration: int, expected_rows: int) -> list[str]:
    problems = []
    train = shards.read_manifest(shards.stage_dir(run, iteration, "train"))
    for stage in ("rollouts", "scored"):
        try:
            table = shards.read_stage(shards.stage_dir(run, iteration, stage), stage)
        except ContractError as error:
            problems.append(f"iteration {iteration}: {error}")
            continue
        if table.num_rows != expected_rows:
            problems.append(f"iteration {iteration} {stage}: {table.num_rows} rows, expected {expected_rows}")
        keys = Counter(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
        duplicated = [key for key, count in keys.items() if count > 1]
        if duplicated:
            problems.append(f"iteration {iteration} {stage}: duplicate (prompt_id, sample_idx) {duplicated[:3]}")
        versions = pc.unique(table.column("policy_version")).to_pylist()
        if versions != [train.policy_version]:
            problems.append(f"iteration {iteration} {stage}: rows sampled by {versions}, trained from "
                            f"{train.policy_version}")
    for version, key in ((iteration, "policy_version"), (iteration + 1, "produced_version")):
        checkpoint, expected = shards.checkpoint_dir(run, version), getattr(train, key)
        if shards.checkpoint_ready(checkpoint) and policy_version(checkpoint) != expected:
            problems.append(f"iteration {iteration}: train manifest says {key} {expected}, "
                            f"{checkpoint.name} is {policy_version(checkpoint)}")
    return problems


def _check_mlflow(run: Path, config, finished: int) -> list[str]:
    from orchestrator.tracking import RUN_ID_FILE, tracking_uri

    id_file = run / RUN_ID_FILE
    if not id_file.exists():  # a run made by the stage CLIs alone was never tracked: nothing to check
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(config, run))
    run_id = id_file.read_text().strip()
    problems = []
    for name in client.get_run(run_id).data.metrics:
        steps = Counter(point.step for point in client.get_metric_history(run_id, name))
        twice = sorted(step for step, count in steps.items() if count > 1)
        if twice:
            problems.append(f"MLflow metric {name}: more than one point at step(s) {twice}")
        if name.startswith(("train.", "rollout.")) and sorted(steps) != list(range(finished)):
            problems.append(f"MLflow metric {name}: steps {sorted(steps)}, expected 0..{finished - 1}")
    return problems


def check_run(run: Path) -> tuple[int, list[str]]:
    """(finished iterations, problems found): an empty list means every invariant holds."""
    run = Path(run)
    config = load_run_config(run)
    expected_rows = config.generate.prompts_per_iteration * config.generate.n
    finished = shards.trained_iterations(run)
    problems = [p for i in range(finished) for p in _check_iteration(run, i, expected_rows)]
    for checkpoint in sorted((run / "checkpoints").glob("v[0-9]*")):
        try:
            shards.verify_checkpoint(checkpoint)
        except ContractError as error:
            problems.append(str(error))
    visible_partials = [p for p in run.rglob("*") if ".tmp" in p.name and not p.name.startswith(".")]
    problems += [f"half-written file visible: {p}" for p in visible_partials]
    problems += _check_mlflow(run, config, finished)
    return finished, problems

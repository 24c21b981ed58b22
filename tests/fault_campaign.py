"""`make faults`: a randomised crash campaign on the tiny world (longer than tests/test_faults.py).

    python tests/fault_campaign.py [--trials 20] [--seed 0] [--out runs/faults]

Two uninterrupted reference runs first (they must agree byte for byte: determinism). Then each
trial starts a fresh two-iteration run and kills it with SIGKILL, either at a named fault point
(common/faults.py: while writing a shard, a manifest, a checkpoint, inside a training step, between
logging to MLflow and recording it) or at a random moment (the whole process group, orchestrator
and stage alike). `make iterate` is then rerun until the run finishes, and the trial passes when
`orchestrator check` finds no problem and the result equals the reference: same rollout shards
(sha256), same checkpoints (policy versions). Results go to <out>/campaign.jsonl and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_helpers import OVERRIDES, orchestrate  # noqa: E402

from common import shards  # noqa: E402
from common.faults import POINTS  # noqa: E402
from common.modeling import policy_version  # noqa: E402
from orchestrator.checks import check_run  # noqa: E402

ITERATIONS = 2
# How often one process reaches each point in this setting (the counter is per process): generate
# writes an eval and a rollout shard and manifest, a train process takes 2 steps and saves once.
REACHED_PER_PROCESS = {"shard": 2, "manifest": 2, "checkpoint": 1, "train_step": 2, "mlflow": 8}


def fingerprint(run: Path) -> dict:
    return {"rollouts": [f["sha256"] for i in range(ITERATIONS)
                         for f in shards.read_manifest(shards.stage_dir(run, i, "rollouts"))["files"]],
            "checkpoints": [policy_version(shards.checkpoint_dir(run, v)) for v in range(ITERATIONS + 1)]}


def kill_at_random_time(run: Path, seconds: float) -> int:
    """Start the run in its own process group and SIGKILL the whole group after `seconds`."""
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config", "configs/tiny.yaml",
               "-n", str(ITERATIONS), *[a for o in OVERRIDES for a in ("-o", o)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def finish(run: Path) -> int:
    """Rerun until the run has its iterations (a crash never needs more than one rerun; allow 3)."""
    for attempt in range(1, 4):
        done = len(list(run.glob("iter=*/train/_MANIFEST.json")))
        result = orchestrate(run, max(ITERATIONS - done, 0))
        if result.returncode == 0 and len(list(run.glob("iter=*/train/_MANIFEST.json"))) == ITERATIONS:
            return attempt
    raise RuntimeError(f"{run} did not finish after 3 reruns: {result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/faults"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    started = time.time()
    references = []
    for name in ("reference-a", "reference-b"):
        run = args.out / f"{stamp}-{name}"
        assert orchestrate(run, ITERATIONS).returncode == 0, f"{name} failed"
        references.append(fingerprint(run))
    reference_seconds = (time.time() - started) / 2
    deterministic = references[0] == references[1]
    print(f"two fresh runs, same seed: {'identical' if deterministic else 'DIFFERENT'} "
          f"({reference_seconds:.0f} s per run)", flush=True)

    results = []
    for trial in range(args.trials):
        run = args.out / f"{stamp}-trial-{trial:02d}"
        if trial % 2 == 0:  # alternate targeted points and random moments
            point = POINTS[(trial // 2) % len(POINTS)]
            where = f"{point}:{rng.randint(1, REACHED_PER_PROCESS[point])}"
            crashed = orchestrate(run, ITERATIONS, fault=where).returncode
        else:
            seconds = rng.uniform(3, reference_seconds)
            where = f"random {seconds:.0f}s"
            crashed = kill_at_random_time(run, seconds)
        reruns = finish(run)
        finished, problems = check_run(run)
        same = fingerprint(run) == references[0]
        results.append({"trial": trial, "fault": where, "crash_exit": crashed, "reruns": reruns,
                        "problems": problems, "same_as_reference": same})
        print(f"trial {trial:2d}  {where:<16} exit {crashed:>4}  reruns {reruns}  problems {len(problems)}  "
              f"same as reference: {same}", flush=True)
        with open(args.out / "campaign.jsonl", "a") as log:
            log.write(json.dumps({"stamp": stamp, **results[-1]}) + "\n")

    killed = sum(r["crash_exit"] != 0 for r in results)
    passed = sum(not r["problems"] and r["same_as_reference"] for r in results)
    print(f"\n{len(results)} trials, {killed} killed mid-run, {passed} passed every invariant and equal the "
          f"reference; determinism of two fresh runs: {deterministic}; {time.time() - started:.0f} s in all")
    raise SystemExit(0 if passed == len(results) and deterministic else 1)


if __name__ == "__main__":
    main()

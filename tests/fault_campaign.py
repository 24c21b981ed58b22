"""`make faults`: a randomised crash campaign on the tiny world (longer than tests/test_faults.py).

    python tests/fault_campaign.py [--trials 20] [--modes resident,subprocess] [--seed 0] [--out runs/faults]

Two uninterrupted reference runs first (they must agree byte for byte: determinism), one per mode
(a resident run writes the bytes stage processes write). Then, per mode, each trial starts a fresh
two-iteration run and kills it with SIGKILL, either at a named fault point (common/faults.py: while
writing a shard, a manifest, a checkpoint, inside a training step, between logging to MLflow and
recording it; the shard, train-step, checkpoint and state points are in a worker process (a
generation worker or a trainer rank: resident, or a stage's local process), the others in the
controller) or at a random moment:
the whole process group; in resident mode also the controller alone (its workers must exit by
themselves) or one worker alone. `make iterate` is then rerun until the run finishes, and the
trial passes when `orchestrator check` finds no problem and the result equals the reference: same
rollout, scored and eval shards (sha256), same checkpoints (policy versions). Results go to
<out>/campaign.jsonl and a table.
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
from common.shards import policy_version  # noqa: E402
from orchestrator.checks import check_run  # noqa: E402

ITERATIONS = 2
# How often one process reaches each point in this setting (the counter is per process). Both modes:
# the controller writes the eval, rollouts, scored and train manifests (9) and logs to MLflow.
# Subprocess: a generate process writes 4 eval and 4 rollout shards, a train process takes 2 steps
# and saves once (policy, then optimizer state). Resident: one worker samples every shard of the run
# (12 eval, 8 rollout) and trains both iterations, writing each optimizer state while the next one
# samples. `rendered` is the controller's, once per run in both modes.
REACHED_PER_PROCESS = {"subprocess": {"shard": 8, "manifest": 9, "checkpoint": 1, "state": 1, "train_step": 2,
                                      "mlflow": 8, "rendered": 1},
                       "resident": {"shard": 20, "manifest": 9, "checkpoint": 2, "state": 2, "train_step": 4,
                                    "mlflow": 8, "rendered": 1}}
RANDOM_TARGETS = {"subprocess": ("group",), "resident": ("group", "controller", "worker")}


def fingerprint(run: Path) -> dict:
    return {stage: [f.sha256 for i in range(ITERATIONS) for f in shards.read_manifest(shards.stage_dir(run, i, stage))
                    .files] for stage in ("rollouts", "scored", "eval")} | {
        "checkpoints": [policy_version(shards.checkpoint_dir(run, v)) for v in range(ITERATIONS + 1)]}


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (an embedded cluster's workers are the controller's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_at_random_time(run: Path, mode: str, seconds: float, target: str, rng: random.Random) -> int:
    """Start the run in its own process group and, after `seconds`, SIGKILL the group, the controller
    alone, or one of its worker processes; then wait until nothing of that group is left."""
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run), "--config", "configs/tiny.yaml",
               "-n", str(ITERATIONS), *[a for o in OVERRIDES + [f"orchestrator.mode={mode}"] for a in ("-o", o)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        workers = children(process.pid)
        if target == "group" or (target == "worker" and not workers):
            os.killpg(process.pid, signal.SIGKILL)
        elif target == "controller":
            process.kill()
        else:
            os.kill(rng.choice(workers), signal.SIGKILL)
        code = process.wait()
        wait_for_group_to_exit(process.pid)
        return code


def wait_for_group_to_exit(group: int, seconds: float = 60.0) -> None:
    """A killed controller's workers exit by themselves (orchestrator/roles.py); give them time, then fail."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(group, signal.SIGKILL)
    raise RuntimeError(f"processes of group {group} outlived their controller by {seconds:.0f} s")


def finish(run: Path, mode: str) -> int:
    """Rerun until the run has its iterations (a crash never needs more than one rerun; allow 3)."""
    for attempt in range(1, 4):
        done = len(list(run.glob("iter=*/train/_MANIFEST.json")))
        result = orchestrate(run, max(ITERATIONS - done, 0), "-o", f"orchestrator.mode={mode}")
        if result.returncode == 0 and len(list(run.glob("iter=*/train/_MANIFEST.json"))) == ITERATIONS:
            return attempt
    raise RuntimeError(f"{run} did not finish after 3 reruns: {result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per mode")
    parser.add_argument("--modes", default="resident,subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/faults"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    modes = args.modes.split(",")

    started = time.time()
    references, seconds = {}, {}
    for mode in modes:
        run = args.out / f"{stamp}-reference-{mode}"
        began = time.time()
        assert orchestrate(run, ITERATIONS, "-o", f"orchestrator.mode={mode}").returncode == 0, f"{mode} reference failed"
        references[mode], seconds[mode] = fingerprint(run), time.time() - began
    deterministic = len({json.dumps(f, sort_keys=True) for f in references.values()}) == 1
    print(f"fresh runs, same seed, {' and '.join(modes)}: {'identical' if deterministic else 'DIFFERENT'} "
          f"({', '.join(f'{m} {s:.0f} s' for m, s in seconds.items())})", flush=True)

    results = []
    for mode in modes:
        for trial in range(args.trials):
            run = args.out / f"{stamp}-{mode}-trial-{trial:02d}"
            if trial % 2 == 0:  # alternate targeted points and random moments
                point = POINTS[(trial // 2) % len(POINTS)]
                where = f"{point}:{rng.randint(1, REACHED_PER_PROCESS[mode][point])}"
                crashed = orchestrate(run, ITERATIONS, "-o", f"orchestrator.mode={mode}", fault=where).returncode
            else:
                moment, target = rng.uniform(3, seconds[mode]), RANDOM_TARGETS[mode][(trial // 2) % len(RANDOM_TARGETS[mode])]
                where = f"random {target} {moment:.0f}s"
                crashed = kill_at_random_time(run, mode, moment, target, rng)
            reruns = finish(run, mode)
            finished, problems = check_run(run)
            same = fingerprint(run) == references[modes[0]]
            results.append({"mode": mode, "trial": trial, "fault": where, "crash_exit": crashed, "reruns": reruns,
                            "problems": problems, "same_as_reference": same})
            print(f"{mode:<10} trial {trial:2d}  {where:<24} exit {crashed:>4}  reruns {reruns}  "
                  f"problems {len(problems)}  same as reference: {same}", flush=True)
            with open(args.out / "campaign.jsonl", "a") as log:
                log.write(json.dumps({"stamp": stamp, **results[-1]}) + "\n")

    for mode in modes:
        mine = [r for r in results if r["mode"] == mode]
        killed = sum(r["crash_exit"] != 0 for r in mine)
        passed = sum(not r["problems"] and r["same_as_reference"] for r in mine)
        print(f"{mode}: {len(mine)} trials, {killed} killed mid-run, {passed} passed every invariant and equal the "
              "reference")
    passed = sum(not r["problems"] and r["same_as_reference"] for r in results)
    print(f"determinism of fresh runs across modes: {deterministic}; {time.time() - started:.0f} s in all")
    raise SystemExit(0 if passed == len(results) and deterministic else 1)


if __name__ == "__main__":
    main()

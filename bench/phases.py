"""`make bench-phases`: each phase's own work in resident mode against subprocess mode, and what each
mode's clock adds to it.

    python -m bench.phases [--iterations 4] [--work runs/bench-phases]

Two fresh runs of the default tiny config (eval off), one per `orchestrator.mode`, one after the other
on this machine; the same seed, so the same samples and steps. Per iteration after the first (which
renders the prompt sets, compiles and loads), from the stage manifests: the phases' own work
(sampling, the teacher's forward, the train stage's lp_old and optimizer steps) and the clock (from
one sealed checkpoint to the next). Resident workers must not slow the work down (contention over the
cores: ratio <= 1.0 within noise) and the resident clock should be within 1.3x of the own work.
Writes bench/results/phases.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench.peers.measure import ROOT, say
from bench.peers.pipeline import pipeline_run
from bench.record import write_results

PHASES = {"generate": "sampling", "teacher": "teacher forward", "train": "lp_old + optimizer steps"}


def phase_medians(run: dict) -> dict:
    later = run["per_iteration"][1:]
    medians = {phase: statistics.median(i[phase]["seconds"] for i in later) for phase in PHASES}
    ends = [c["seconds"] for c in run["checkpoints"][1:]]
    medians["clock"] = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    medians["own"] = statistics.median(sum(i[p]["seconds"] for p in PHASES) for i in later)
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4, help="iterations per run (%(default)s; >= 3)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-phases")
    args = parser.parse_args(argv)
    if args.iterations < 3:
        parser.error("--iterations must be >= 3 (the first iteration is not counted)")
    loads, figures = [os.getloadavg()[0]], {}
    for mode in ("subprocess", "resident"):
        say(f"{mode}: {args.iterations} iterations (load {os.getloadavg()[0]:.2f})")
        run = pipeline_run(mode, args.work / mode, args.iterations, 3600, [f"orchestrator.mode={mode}"])
        figures[mode] = phase_medians(run)
        loads.append(run["load_mean"])
        say(f"{mode}: " + ", ".join(f"{k} {v:.2f}s" for k, v in figures[mode].items()))
    sub, res = figures["subprocess"], figures["resident"]
    rows = []
    for phase, what in PHASES.items():
        rows += [{"metric": f"{what}, subprocess (median s per iteration)", "value": round(sub[phase], 3),
                  "unit": "s", "goal": "", "met": None},
                 {"metric": f"{what}, resident", "value": round(res[phase], 3), "unit": "s", "goal": "", "met": None},
                 {"metric": f"{what}, resident / subprocess", "value": round(res[phase] / sub[phase], 3),
                  "unit": "x", "goal": "<= 1.0", "met": res[phase] / sub[phase] <= 1.0}]
    for mode, f in figures.items():
        rows += [{"metric": f"clock per iteration, {mode}", "value": round(f["clock"], 2), "unit": "s", "goal": "",
                  "met": None},
                 {"metric": f"clock / own work, {mode}", "value": round(f["clock"] / f["own"], 2), "unit": "x",
                  "goal": "<= 1.3" if mode == "resident" else "", "met": f["clock"] / f["own"] <= 1.3
                  if mode == "resident" else None}]
    rows.append({"metric": "load average (1 min) before, and mean during each run", "value": round(max(loads), 2),
                 "unit": "max", "goal": "< 1.5 before", "met": loads[0] < 1.5})
    write_results("phases", f"python -m bench.phases --iterations {args.iterations}", rows)
    for row in rows:
        print(f"{row['metric']:<60} {row['value']:>8} {row['unit']:<4} {row['goal']}")


if __name__ == "__main__":
    main()

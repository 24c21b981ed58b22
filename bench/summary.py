"""One table of every benchmark's latest figures: docs/benchmarks.md from bench/results/*.json.

    python -m bench.summary [--results bench/results] [--out docs/benchmarks.md]   (last step of `make bench`)

Each benchmark writes bench/results/<name>.json:

    {"benchmark": name, "command": "make bench-<name>", "date": ISO date, "machine": "...",
     "rows": [{"metric": str, "value": float, "unit": str, "goal": str, "met": bool | null}]}

(bench/record.py's `write_results` writes it). The project's benchmarks that have no file yet are
listed as "not run".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.record import RESULTS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks.md"
# The project's benchmarks, in the order `make bench` runs them.
BENCHMARKS = ["verifier", "train", "generate", "score", "peers"]


def format_value(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


def load_results(results: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(results.glob("*.json")):
        document = json.loads(path.read_text())
        found[document.get("benchmark", path.stem)] = document
    return found


def render(results: Path = RESULTS) -> str:
    found = load_results(results)
    names = BENCHMARKS + sorted(set(found) - set(BENCHMARKS))
    lines = [
        "# Benchmarks",
        "",
        "Latest figures of every benchmark, rendered by `python -m bench.summary` from `bench/results/*.json`",
        "(`make bench` runs them all and then this; `make bench-<name>` runs one). Each figure is what that",
        "run measured on the machine named beside it; on a shared machine they move by tens of percent",
        "between runs (see each benchmark's own notes).",
        "",
        "| benchmark | metric | value | unit | goal | met | date | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        document = found.get(name)
        if document is None:
            lines.append(f"| {name} | not run (`make bench-{name}`) | | | | | | |")
            continue
        rows = document.get("rows") or [{"metric": "no rows", "value": "", "unit": "", "goal": "", "met": None}]
        for index, row in enumerate(rows):
            first = index == 0
            lines.append("| " + " | ".join([
                f"[{name}](../bench/results/{name}.json)" if first else "",
                str(row["metric"]), format_value(row["value"]), str(row.get("unit", "")), str(row.get("goal", "")),
                format_met(row.get("met")), document.get("date", "") if first else "",
                document.get("machine", "") if first else "",
            ]) + " |")
    details = {"peers": "bench/results.md", "phases": "docs/engines.md", "generate": "docs/engines.md",
               "score": "docs/engines.md", "train": "docs/training.md", "verifier": "docs/verifier.md"}
    lines += ["", "Details: " + ", ".join(f"{name} in [{path}](../{path})" for name, path in details.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of <name>.json (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT, help="markdown to write (default: %(default)s)")
    args = parser.parse_args()
    text = render(args.results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    present = len(load_results(args.results))
    print(f"wrote {args.out}: {present} benchmark(s) with results, "
          f"{len(set(BENCHMARKS) - set(load_results(args.results)))} of the project's not run")


if __name__ == "__main__":
    main()

"""Throughput of the math verifier on this machine (`make bench-verifier`), in wall-clock responses/s.

    python bench/verifier.py [--n 20000] [--workers 2] [--passes 8] [--repeats 5] [--baseline ../main ...]
    python bench/verifier.py --steady-only [--rounds 4] --baseline DIR ...

What is timed, and through what:
- 4 kB responses with integer answers (DAPO's case), and the same with 1% adversarial responses
  (power towers, a megabyte of nested braces): whole calls of the batch CLI
  (`python -m common.verifier`), start-up included; median of --repeats calls each.
- The public case mix (../shared/data/verifier-cases-public.jsonl, each pred boxed in a short response):
  cold: one fresh CLI call per pass, so python start-up, imports, the worker pool's start and
        warm-up and a first sight of every answer are all in it; median of --repeats calls. Also
        printed: CPU time per response of the CLI process and all its descendants (this process
        becomes a subreaper, so it reaps and counts the forkserver and workers that outlive the CLI).
  steady: `grade_batch` (what the score stage calls) in one process: one pass to start the pool,
        then --passes passes, each its own grade_batch call over the shuffled cases; median. The
        pool keeps no results between calls (parsed golds are cached within a call only), but its
        parser has met these answer shapes before, and sympy keeps its own cache. Also printed:
        CPU time per response (the calling process and all its descendants), which the other jobs on
        a shared machine disturb less than wall time, and the rate it gives on --workers free cores.
- `error` statuses (bugs of the verifier, common/verifier/status.py) in the cold and steady passes:
  the goal is none. Every figure is printed with the 1-minute load average while it was measured.
- The adversarial slow-down again with grade_batch alone, in-process (without the CLI's JSON reading),
  and the slowest single adversarial response (bound: the 5 s timeout).
With --baseline DIR ... (other checkouts, e.g. ../main), the CLI and steady figures are measured for
them too, interleaved with ours, with the same protocol (printed only). With --steady-only, only the
steady figures, in --rounds rounds alternated over the checkouts (printed only).

Writes bench/results/verifier.json: {"benchmark", "command", "date", "machine", "rows": [{"metric",
"value", "unit", "goal", "met"}]}.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the shared folder sits next to the repository (../shared), as in the tests
PUBLIC = SHARED / "data" / "verifier-cases-public.jsonl"
RESULTS = ROOT / "bench" / "results" / "verifier.json"
FILLER = ("We expand $(x+1)^2 = x^2 + 2x + 1$ and compare coefficients: \\frac{a}{b} + \\sqrt{c} gives "
          "the constraint $a + b = 17$, so substituting back we obtain a quadratic in $t$. ")
ADVERSARIAL = [
    "so \\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
    "{" * 1_000_000 + " \\boxed{3}",
    "the answer is \\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "the answer is \\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{99999999999}}",
]
GOAL_PUBLIC = 200.0
GOAL_INTEGER = 2_000.0
GOAL_SLOWDOWN = 10.0
TIMEOUT_S = 5.0

# The steady-state passes, run in a process of the checkout under test: only grade_batch is assumed.
STEADY = r'''
import json, os, random, sys, time
from pathlib import Path
import common.verifier as verifier

def cpu():  # utime + stime of this process and of every live descendant (workers, forkserver), from /proc
    stats = {}
    for name in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split() if name.isdigit() else None
        except OSError:
            continue
        if fields:
            stats[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    me, ticks, pids = os.getpid(), 0, []
    for pid, (parent, used) in stats.items():
        while parent in stats and parent != me:
            parent = stats[parent][0]
        if parent == me:
            ticks, pids = ticks + used, pids + [pid]
    return sorted(pids), ticks / os.sysconf("SC_CLK_TCK") + time.process_time()

def main():
    pairs, passes, workers = json.loads(sys.stdin.read()), int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(0)
    started = time.perf_counter()
    grades = verifier.grade_batch(pairs, workers=workers, timeout_s=5.0)
    first = [g.correct for g in grades]
    out = {"first": len(pairs) / (time.perf_counter() - started), "correct": first, "rates": [], "cpu_s": [],
           "timeouts": [sum(g.status == "timeout" for g in grades)], "errors": [sum(g.status == "error" for g in grades)],
           "changed": 0, "loads": []}
    for _ in range(passes):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        pids, cpu_before = cpu()
        started = time.perf_counter()
        grades = verifier.grade_batch([pairs[i] for i in order], workers=workers, timeout_s=5.0)
        out["rates"].append(len(pairs) / (time.perf_counter() - started))
        after_pids, cpu_after = cpu()
        if pids and after_pids == pids:  # a worker replaced mid-pass takes its CPU time with it
            out["cpu_s"].append(cpu_after - cpu_before)
        out["timeouts"].append(sum(g.status == "timeout" for g in grades))  # a loaded machine can push one past 5 s
        out["errors"].append(sum(g.status == "error" for g in grades))
        out["loads"].append(os.getloadavg()[0])
        out["changed"] += sum(grades[k].correct != first[i] for k, i in enumerate(order))
    print(json.dumps(out))

if __name__ == "__main__":
    main()
'''


def integer_rows(n: int, rng: random.Random) -> list[dict]:
    body = (FILLER * (4000 // len(FILLER) + 1))[:4000]
    rows = []
    for _ in range(n):
        gold = rng.randint(0, 100_000)
        answer = gold if rng.random() < 0.5 else gold + rng.randint(1, 9)
        rows.append({"gold": str(gold), "response": f"{body}\nTherefore the answer is $\\boxed{{{answer}}}$."})
    return rows


def environment(checkout: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(checkout))  # the checkout's own code, not an installed copy


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux prctl PR_SET_CHILD_SUBREAPER), so that the
    CPU time of a CLI call's forkserver and workers, which outlive the CLI process by a moment, is ours to count."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def run_cli(checkout: Path, stdin: str, workers: int) -> tuple[float, float, list[dict]]:
    """(wall seconds of the whole CLI call, CPU seconds, output rows). The CPU time is that of the CLI process
    and, once this process is a subreaper, of all its descendants (forkserver, workers); else of the CLI only."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "common.verifier", "--workers", str(workers)], input=stdin,
                          capture_output=True, text=True, cwd=checkout, env=environment(checkout), check=True)
    seconds = time.perf_counter() - started
    _reap_orphans()  # only CLI descendants exist now: this process starts its own pool after the CLI calls
    return seconds, _children_cpu() - cpu_before, [json.loads(line) for line in done.stdout.splitlines()]


def run_steady(checkout: Path, pairs: list[tuple[str, str]], passes: int, workers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", STEADY, str(passes), str(workers)], input=json.dumps(pairs),
                          capture_output=True, text=True, cwd=checkout, env=environment(checkout))
    if done.returncode:
        sys.exit(f"error: the steady-state passes failed in {checkout}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def public_mix() -> tuple[list[dict], list[tuple[str, str]]]:
    """The public cases, and each pred boxed in a short response (what every public-mix figure grades)."""
    cases = [json.loads(line) for line in PUBLIC.read_text().splitlines()]
    return cases, [(f"The final answer is \\boxed{{{c['pred']}}}.", c["gold"]) for c in cases]


def steady_only(checkouts: dict[str, Path], rounds: int, passes: int, workers: int) -> None:
    """The steady protocol alone, checkouts alternated round by round so that the machine's drift hits all alike."""
    _, pairs = public_mix()
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(rounds):
        for name, checkout in checkouts.items():
            runs[name].append(run_steady(checkout, pairs, passes, workers))
    for name, done in runs.items():
        cpu_ms = [1000 * cpu / len(pairs) for run in done for cpu in run["cpu_s"]]
        loads = [load for run in done for load in run["loads"]]
        print(f"{name}: median {statistics.median([r for run in done for r in run['rates']]):,.0f} responses/s, "
              f"{statistics.median(cpu_ms):.2f} ms CPU per response ({rounds} x {passes} passes; load "
              f"{min(loads):.1f}-{max(loads):.1f}; timeouts {sum(sum(run['timeouts']) for run in done)}, "
              f"error statuses {sum(sum(run['errors']) for run in done)})")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def row(metric: str, value: float, unit: str, goal: str, met: bool | None) -> dict:
    return {"metric": metric, "value": round(value, 4), "unit": unit, "goal": goal, "met": None if met is None else bool(met)}


def rates(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="integer-answer responses per CLI call")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=8, help="steady-state passes over the public mix")
    parser.add_argument("--repeats", type=int, default=5, help="CLI calls per CLI figure (the median is reported)")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="other checkouts to measure alongside (e.g. ../main)")
    parser.add_argument("--steady-only", action="store_true",
                        help="only the steady public-mix figures, in --rounds rounds alternated over the checkouts "
                             "(printed only; how docs/verifier.md measured what each removal cost)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of --passes steady passes, with --steady-only")
    args = parser.parse_args()
    if not PUBLIC.exists():
        sys.exit(f"error: {PUBLIC} not found (the shared data folder sits next to the repository: ../shared)")
    checkouts = {"this checkout": ROOT} | {f"baseline {path}": path.resolve() for path in args.baseline}
    rng = random.Random(0)
    loads = [os.getloadavg()[0]]
    print(f"{os.cpu_count()} CPUs ({cpu_model()}), load average {loads[0]:.2f} before the runs (other jobs on this machine)")
    tree_cpu = become_subreaper()
    if args.steady_only:
        return steady_only(checkouts, args.rounds, args.passes, args.workers)

    integers = integer_rows(args.n, rng)
    mixed = list(integers)
    for k in range(len(integers) // 100):  # 1% adversarial
        mixed[rng.randrange(len(mixed))] = {"gold": "3", "response": ADVERSARIAL[k % len(ADVERSARIAL)]}
    cases, pairs = public_mix()
    stdins = {name: "".join(json.dumps({"gold": r["gold"], "response": r["response"]}) + "\n" for r in rows)
              for name, rows in [("integer", integers), ("mixed", mixed),
                                 ("public", [{"gold": g, "response": r} for r, g in pairs])]}

    # CLI calls, alternated (checkouts and cases) so that drifts of the machine's load hit all alike.
    cli: dict[tuple[str, str], list[float]] = {}
    cli_cpu: dict[tuple[str, str], list[float]] = {}
    cli_load: dict[tuple[str, str], list[float]] = {}  # the 1-minute load average when each call started
    outputs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for name, checkout in checkouts.items():
            for case in ("integer", "mixed", "public"):
                cli_load.setdefault((name, case), []).append(os.getloadavg()[0])
                seconds, cpu, outputs[(name, case)] = run_cli(checkout, stdins[case], args.workers)
                cli.setdefault((name, case), []).append(len(integers if case != "public" else pairs) / seconds)
                cli_cpu.setdefault((name, case), []).append(cpu)
    steady = {name: run_steady(checkout, pairs, args.passes, args.workers) for name, checkout in checkouts.items()}
    loads.append(os.getloadavg()[0])

    def load(values: list[float]) -> str:
        return f"load {min(values):.1f}-{max(values):.1f}"

    results = {}
    for name in checkouts:
        base, with_adversarial = statistics.median(cli[(name, "integer")]), statistics.median(cli[(name, "mixed")])
        cold, steady_rate = statistics.median(cli[(name, "public")]), statistics.median(steady[name]["rates"])
        out = outputs[(name, "public")]
        agree = sum(o["correct"] == c["equal"] for o, c in zip(out, cases))
        false_positives = sum(o["correct"] and not c["equal"] for o, c in zip(out, cases))
        differ = sum(a != o["correct"] for a, o in zip(steady[name]["correct"], out))
        slowdown = 100 * (1 - with_adversarial / base)
        print(f"\n{name}:")
        print(f"  integer answers, 4 kB responses (CLI, {len(integers)} per call, start-up included): median "
              f"{base:,.0f} responses/s ({rates(cli[(name, 'integer')])}; {load(cli_load[(name, 'integer')])})")
        cpu_slowdown = 100 * (statistics.median(cli_cpu[(name, "mixed")]) / statistics.median(cli_cpu[(name, "integer")]) - 1)
        print(f"  with 1% adversarial: median {with_adversarial:,.0f} responses/s ({rates(cli[(name, 'mixed')])}), "
              f"slow-down {slowdown:.1f}% (in CPU time of the CLI process: {cpu_slowdown:.1f}%; statuses "
              f"{sorted({o['status'] for o in outputs[(name, 'mixed')]})}; {load(cli_load[(name, 'mixed')])})")
        cold_cpu_ms = 1000 * statistics.median(cli_cpu[(name, "public")]) / len(pairs)
        cold_errors = sum(o["status"] == "error" for o in out)
        print(f"  public case mix, cold (a fresh CLI call per pass): median {cold:,.0f} responses/s "
              f"({rates(cli[(name, 'public')])}; {load(cli_load[(name, 'public')])}); agreement {agree}/{len(cases)}, "
              f"false positives {false_positives}, error statuses {cold_errors}")
        print(f"    CPU time ({'the CLI process and all its descendants' if tree_cpu else 'the CLI process only'}): "
              f"median {cold_cpu_ms:.1f} ms/response")
        print(f"  public case mix, steady (grade_batch, {args.workers} workers, one process): median {steady_rate:,.0f} "
              f"responses/s over {args.passes} passes ({rates(steady[name]['rates'])}); the first call: "
              f"{steady[name]['first']:,.0f}/s; {load(steady[name]['loads'])}; timeouts per call "
              f"{steady[name]['timeouts']}, error statuses per call {steady[name]['errors']}, answers that changed "
              f"between calls {steady[name]['changed']}, first call vs the CLI {differ}")
        cpu_ms = float("nan")
        if steady[name]["cpu_s"]:
            cpu_ms = 1000 * statistics.median(steady[name]["cpu_s"]) / len(pairs)
            print(f"    CPU time (the calling process and all its descendants): median {cpu_ms:.2f} ms/response, so "
                  f"{args.workers} free cores would give about {args.workers * 1000 / cpu_ms:,.0f} responses/s")
        errors = cold_errors + sum(steady[name]["errors"])
        results[name] = (base, slowdown, cold, steady_rate, agree, false_positives, cold_cpu_ms, cpu_ms, errors)

    sys.path.insert(0, str(ROOT))  # this checkout's verifier, in-process
    from common.verifier import grade_batch

    # The same slow-down without the CLI's reading of 80 MB more JSON: grade_batch alone, in this process.
    integer_pairs = [(r["response"], r["gold"]) for r in integers]
    mixed_pairs = [(r["response"], r["gold"]) for r in mixed]
    in_process: dict[str, list[float]] = {"integer": [], "mixed": []}
    for _ in range(args.repeats):
        for case, case_pairs in (("integer", integer_pairs), ("mixed", mixed_pairs)):
            started = time.perf_counter()
            grade_batch(case_pairs, workers=args.workers, timeout_s=TIMEOUT_S)
            in_process[case].append(len(case_pairs) / (time.perf_counter() - started))
    grading_slowdown = 100 * (1 - statistics.median(in_process["mixed"]) / statistics.median(in_process["integer"]))
    print(f"\ngrade_batch alone (in-process): integer answers median {statistics.median(in_process['integer']):,.0f} "
          f"responses/s ({rates(in_process['integer'])}), with 1% adversarial {statistics.median(in_process['mixed']):,.0f} "
          f"({rates(in_process['mixed'])}): slow-down {grading_slowdown:.1f}% (load {os.getloadavg()[0]:.1f} after)")

    slowest = 0.0
    for text in ADVERSARIAL:
        started = time.perf_counter()
        grade_batch([(text, "3")], timeout_s=TIMEOUT_S)
        slowest = max(slowest, time.perf_counter() - started)
    print(f"\nslowest single adversarial response (in-process, bound {TIMEOUT_S:.0f} s): {slowest * 1000:.1f} ms "
          f"(load {os.getloadavg()[0]:.1f})")
    print(f"load average: {loads[0]:.2f} before, {loads[1]:.2f} after")

    base, slowdown, cold, steady_rate, agree, false_positives, cold_cpu_ms, cpu_ms, errors = results["this checkout"]
    rows = [
        row("integer answers, 4 kB responses (CLI, start-up included)", base, "responses/s",
            f">= {GOAL_INTEGER:,.0f} responses/s", base >= GOAL_INTEGER),
        row("slow-down from 1% adversarial responses (CLI, which also reads their 80 MB of JSON)", slowdown, "%",
            f"< {GOAL_SLOWDOWN:.0f}%", slowdown < GOAL_SLOWDOWN),
        row("slow-down from 1% adversarial responses (grade_batch alone)", grading_slowdown, "%",
            f"< {GOAL_SLOWDOWN:.0f}%", grading_slowdown < GOAL_SLOWDOWN),
        row("public case mix, cold pass (fresh CLI call, pool start included)", cold, "responses/s",
            f">= {GOAL_PUBLIC:.0f} responses/s", cold >= GOAL_PUBLIC),
        row("public case mix, steady state (grade_batch, warm pool)", steady_rate, "responses/s",
            f">= {GOAL_PUBLIC:.0f} responses/s", steady_rate >= GOAL_PUBLIC),
        row("public case mix, cold pass: CPU time per response (CLI process and descendants)", cold_cpu_ms, "ms",
            "", None),
        row("public case mix, steady state: CPU time per response (caller and workers)", cpu_ms, "ms",
            f"<= {args.workers * 1000 / GOAL_PUBLIC:.0f} ms ({GOAL_PUBLIC:.0f}/s on {args.workers} free cores)",
            cpu_ms <= args.workers * 1000 / GOAL_PUBLIC),
        row("public case mix, 'error' statuses (bugs of the verifier), cold and steady passes", errors, "count", "0",
            errors == 0),
        row("public case mix, agreement with labels", agree / len(cases), "fraction", ">= 0.97", agree / len(cases) >= 0.97),
        row("public case mix, false positives", false_positives, "count", "0", false_positives == 0),
        row("slowest single adversarial response", slowest, "s", f"< {TIMEOUT_S:.0f} s", slowest < TIMEOUT_S),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "verifier",
        "command": "make bench-verifier",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {cpu_model()} (shared; 1-min load average {loads[0]:.1f} before, "
                   f"{loads[1]:.1f} after)",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

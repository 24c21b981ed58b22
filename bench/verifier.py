"""Throughput of the math verifier through its batch CLI (`python -m stages.score.verifier`), on this machine.

    python bench/verifier.py [--n 20000] [--workers 2] [--passes 10]

Cases: 4 kB responses with integer answers (DAPO's case); the public case mix
(/work/shared/data/verifier-cases-public.jsonl, each pred boxed in a short response), once per CLI
call and then --passes times shuffled in one call; the integer case with 1% adversarial responses
mixed in (power towers, a megabyte of nested braces). Prints responses/s, the adversarial slow-down
and the slowest single adversarial response.

Every figure is wall time of whole CLI calls, so each includes start-up (python, the sympy and
math-verify imports, the forkserver), which is printed on its own. The steady-state figure of the
public mix is the marginal rate: (rows of the long call - one pass) / (its time - the single-pass
time). The verifier keeps no result cache of its own; sympy's internal cache and math-verify's
20-entry parse cache do see the repeated answers (see the README for their share).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = Path("/work/shared/data/verifier-cases-public.jsonl")
FILLER = ("We expand $(x+1)^2 = x^2 + 2x + 1$ and compare coefficients: \\frac{a}{b} + \\sqrt{c} gives "
          "the constraint $a + b = 17$, so substituting back we obtain a quadratic in $t$. ")
ADVERSARIAL = [
    "so \\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
    "{" * 1_000_000 + " \\boxed{3}",
    "the answer is \\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "the answer is \\boxed{10^{10^{10^{10}}}}",
    "\\boxed{9^{99999999999}}",
]


def integer_rows(n: int, rng: random.Random) -> list[dict]:
    body = (FILLER * (4000 // len(FILLER) + 1))[:4000]
    rows = []
    for _ in range(n):
        gold = rng.randint(0, 100_000)
        answer = gold if rng.random() < 0.5 else gold + rng.randint(1, 9)
        rows.append({"gold": str(gold), "response": f"{body}\nTherefore the answer is $\\boxed{{{answer}}}$."})
    return rows


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so that the CLI's forkserver and its workers, which the CLI
    does not wait for, are reaped here and their CPU time shows in RUSAGE_CHILDREN."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(rows: list[dict], workers: int) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds of the CLI and all its processes, output rows)."""
    stdin = "".join(json.dumps(r) + "\n" for r in rows)
    cpu_before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.score.verifier", "--workers", str(workers)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    while True:  # reap the adopted forkserver once it has seen the CLI exit
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return seconds, _children_cpu() - cpu_before, [json.loads(line) for line in done.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=10, help="passes over the public mix for the steady state")
    args = parser.parse_args()
    rng = random.Random(0)
    print(f"load average before the runs (other jobs on this machine): {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    counted = become_subreaper()

    integers = integer_rows(args.n, rng)
    seconds, _, out = run_cli(integers, args.workers)
    base = len(integers) / seconds
    print(f"integer answers, 4 kB responses: {base:,.0f} responses/s ({len(integers)} in {seconds:.2f}s, "
          f"statuses {sorted({o['status'] for o in out})})")

    startup, startup_cpu, _ = run_cli([{"gold": "x + 1", "response": "\\boxed{1 + x}"}], args.workers)
    print(f"start-up (one symbolic response): {startup:.2f}s, {startup_cpu:.2f} CPU s")

    cases = [json.loads(line) for line in PUBLIC.read_text().splitlines()]
    public = [{"gold": c["gold"], "response": f"The final answer is \\boxed{{{c['pred']}}}.", "equal": c["equal"]}
              for c in cases]
    single, single_cpu, out = run_cli(public, args.workers)
    agree = sum(o["correct"] == c["equal"] for o, c in zip(out, cases))
    false_positives = sum(o["correct"] and not c["equal"] for o, c in zip(out, cases))
    print(f"public case mix, one pass: {len(public) / single:,.0f} responses/s ({len(public)} in {single:.2f}s "
          f"with start-up; agreement {agree}/{len(cases)} = {agree / len(cases):.3f}, false positives {false_positives})")
    repeated = public * args.passes
    rng.shuffle(repeated)
    seconds, cpu, out = run_cli(repeated, args.workers)
    wrong = sum(o["correct"] != r["equal"] for o, r in zip(out, repeated))
    marginal = (len(repeated) - len(public)) / (seconds - single)
    print(f"public case mix, {args.passes} passes shuffled in one call: {marginal:,.0f} responses/s steady state "
          f"({len(repeated)} in {seconds:.2f}s, {len(repeated) / seconds:,.0f}/s with start-up; "
          f"disagreements {wrong} = {args.passes} x {len(cases) - agree})")
    if counted:  # wall time depends on what else runs here; CPU time much less
        steady_cpu = (cpu - single_cpu) / (len(repeated) - len(public))
        print(f"  CPU time: one pass {single_cpu:.1f} s, {args.passes} passes {cpu:.1f} s; steady state "
              f"{1000 * steady_cpu:.2f} CPU ms/response = {args.workers / steady_cpu:,.0f} responses/s if "
              f"{args.workers} cores were free")

    mixed = list(integers)
    for k in range(len(integers) // 100):  # 1% adversarial
        mixed[rng.randrange(len(mixed))] = {"gold": "3", "response": ADVERSARIAL[k % len(ADVERSARIAL)]}
    seconds, _, out = run_cli(mixed, args.workers)
    rate = len(mixed) / seconds
    print(f"with 1% adversarial: {rate:,.0f} responses/s, slow-down {100 * (1 - rate / base):.1f}% "
          f"(statuses {sorted({o['status'] for o in out})})")

    from stages.score.verifier import grade_batch
    slowest = 0.0
    for text in ADVERSARIAL:
        started = time.perf_counter()
        grade_batch([(text, "3")], timeout_s=5.0)
        slowest = max(slowest, time.perf_counter() - started)
    print(f"slowest single adversarial response (in-process, bound 5 s): {slowest * 1000:.1f} ms")


if __name__ == "__main__":
    main()

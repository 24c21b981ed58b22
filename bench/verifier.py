"""Throughput of the math verifier through its batch CLI (`python -m stages.score.verifier`), on this machine.

    python bench/verifier.py [--n 20000] [--workers 2]

Three cases: 4 kB responses with integer answers (DAPO's case), the public case mix
(/work/shared/data/verifier-cases-public.jsonl, each pred boxed in a short response, each case once)
and the integer case with 1% adversarial responses mixed in (power towers, a megabyte of nested
braces). Prints responses/s, the adversarial slow-down and the slowest single adversarial response.
"""
from __future__ import annotations

import argparse
import json
import random
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


def run_cli(rows: list[dict], workers: int) -> tuple[float, list[dict]]:
    stdin = "".join(json.dumps(r) + "\n" for r in rows)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.score.verifier", "--workers", str(workers)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    return seconds, [json.loads(line) for line in done.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rng = random.Random(0)

    integers = integer_rows(args.n, rng)
    seconds, out = run_cli(integers, args.workers)
    base = len(integers) / seconds
    print(f"integer answers, 4 kB responses: {base:,.0f} responses/s ({len(integers)} in {seconds:.2f}s, "
          f"statuses {sorted({o['status'] for o in out})})")

    cases = [json.loads(line) for line in PUBLIC.read_text().splitlines()]
    public = [{"gold": c["gold"], "response": f"The final answer is \\boxed{{{c['pred']}}}."} for c in cases]
    seconds, out = run_cli(public, args.workers)
    agree = sum(o["correct"] == c["equal"] for o, c in zip(out, cases)) / len(cases)
    print(f"public case mix: {len(public) / seconds:,.0f} responses/s ({len(public)} in {seconds:.2f}s, "
          f"agreement {agree:.3f})")

    mixed = list(integers)
    for k in range(len(integers) // 100):  # 1% adversarial
        mixed[rng.randrange(len(mixed))] = {"gold": "3", "response": ADVERSARIAL[k % len(ADVERSARIAL)]}
    seconds, out = run_cli(mixed, args.workers)
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

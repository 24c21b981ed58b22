"""Batch CLI of the math verifier (a stable contract: tests and benchmarks use it).

    python -m common.verifier [--workers K] [--timeout S] [--mode correct|deepscaler] < in.jsonl > out.jsonl

Input lines: {"gold": str, "response": str}. Output lines, in the same order:
{"correct": bool, "reward": float, "status": "ok|no_answer|timeout|parse_error|error", "extracted": str|null}.
`error` is a bug of the verifier (see common/verifier/status.py); each distinct one is logged on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from common.verifier import DEFAULT_TIMEOUT_S, DEFAULT_WORKERS, MODES, grade_batch


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m common.verifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="symbolic worker processes")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per response")
    parser.add_argument("--mode", choices=MODES, default="correct", help="reward mode")
    args = parser.parse_args()
    if args.workers < 1 or args.timeout <= 0:
        parser.error("--workers must be >= 1 and --timeout > 0")
    pairs = []
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["response"]), str(row["gold"])))
        except (ValueError, KeyError, TypeError) as error:
            parser.exit(2, f"stdin line {number}: expected {{\"gold\": str, \"response\": str}} ({error})\n")
    grades = grade_batch(pairs, args.mode, args.workers, args.timeout)
    out = sys.stdout
    for g in grades:
        out.write(json.dumps({"correct": g.correct, "reward": g.reward, "status": g.status,
                              "extracted": g.extracted_answer}, ensure_ascii=False) + "\n")
    out.flush()


if __name__ == "__main__":
    main()

"""The tiny world's task: column addition with a worked, step-by-step solution.

Rows follow the DAPO-Math-17k parquet schema so the pipeline reads them exactly as it reads the real
data. The teacher is trained on `worked_solution`, a short carry-by-carry derivation ending in
\\boxed{answer}: there is a token-level behaviour to distill, not only a final number.
"""
from __future__ import annotations

import random

import pyarrow as pa

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_SOURCE = "tiny_arith"

DAPO_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.string())])),
])


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? {INSTRUCTION}"


def worked_solution(a: int, b: int) -> str:
    """One line per column, right to left, carrying explicitly; then the boxed sum."""
    lines, carry = [], 0
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    for col in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[col]) if col < len(digits_a) else 0
        db = int(digits_b[col]) if col < len(digits_b) else 0
        total = da + db + carry
        lines.append(f"{da}+{db}+{carry}={total}")
        carry = total // 10
    lines.append(f"So {a}+{b}=\\boxed{{{a + b}}}.")
    return "\n".join(lines)


def _operand(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def make_pairs(seed: int, n_train: int, n_eval: int, max_digits: int) -> tuple[list, list]:
    """Disjoint train and eval (a, b) pairs, deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pairs = []
    while len(pairs) < n_train + n_eval:
        pair = (_operand(rng, max_digits), _operand(rng, max_digits))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs[n_eval:], pairs[:n_eval]


def to_table(pairs: list[tuple[int, int]], split: str) -> pa.Table:
    rows = [{
        "data_source": DATA_SOURCE,
        "prompt": [{"content": question(a, b), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": str(a + b), "style": "rule"},
        "extra_info": {"index": f"tiny-{split}-{k:06d}"},
    } for k, (a, b) in enumerate(pairs)]
    return pa.Table.from_pylist(rows, schema=DAPO_SCHEMA)


def parse_question(text: str) -> tuple[int, int]:
    left, right = text.removeprefix("What is ").split("?")[0].split(" + ")
    return int(left), int(right)

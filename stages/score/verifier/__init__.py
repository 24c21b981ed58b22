"""The math verifier: the rule reward of a response against a ground truth.

    grade(response, gold, mode="correct") -> Grade
    grade_batch(pairs, mode, workers, timeout_s) -> list[Grade]   # always completes

Extraction (extract.py) and the sympy-free tiers of equivalence.py (integers, decimals, simple
fractions and surds, the number prose ends on) run in the calling process; everything else goes
to a persistent pool of killable worker processes (pool.py) with a hard time bound.
`shutdown()` stops the pool (it also runs at interpreter exit); the next call starts it again.
`python -m stages.score.verifier` is the batch CLI over JSON lines.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.score.verifier.equivalence import decide, fast_equal, guard
from stages.score.verifier.extract import extract_answer, has_think_answer_format
from stages.score.verifier.pool import run_symbolic, shutdown, worker_pids

MODES = ("correct", "deepscaler")
DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 5.0
# The card's reward: 0.67 for a correct boxed answer, 0.33 for the <think>...<answer> format.
DEEPSCALER_CORRECT, DEEPSCALER_FORMAT = 0.67, 0.33


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool
    extracted_answer: str | None
    status: str  # ok | no_answer | timeout | parse_error


def _reward(mode: str, correct: bool, from_box: bool, response: str) -> float:
    if mode == "correct":
        return float(correct)
    reward = DEEPSCALER_CORRECT if correct and from_box else 0.0
    if has_think_answer_format(response):
        reward += DEEPSCALER_FORMAT
    return round(reward, 4)


def grade_batch(pairs: list[tuple[str, str]], mode: str = "correct", workers: int = DEFAULT_WORKERS,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Grade]:
    """Grade (response, gold) pairs, in order. Fast-path answers never leave this process."""
    if mode not in MODES:
        raise ValueError(f"reward mode '{mode}' is not one of {', '.join(MODES)}")
    decided: list[tuple[bool, str] | None] = []
    extracted: list[tuple[str | None, bool]] = []
    slow: list[tuple[int, str]] = []  # (index, the pred a worker should parse)
    for index, (response, gold) in enumerate(pairs):
        answer, status, from_box = extract_answer(response)
        extracted.append((answer, from_box))
        if answer is None:
            decided.append((False, status))
            continue
        equal = fast_equal(answer, gold.strip())
        if equal is not None:
            decided.append((equal, "ok"))
        elif guard(answer) or guard(gold):  # power towers and the like never reach a worker
            decided.append((False, "parse_error"))
        else:
            pred, decision = decide(answer, gold.strip())
            decided.append(decision)
            if decision is None:
                slow.append((index, pred))
    # Identical (pred, gold) pairs are graded once: the samples of a prompt often agree.
    jobs = list(dict.fromkeys((pred, pairs[index][1].strip()) for index, pred in slow))
    results = dict(zip(jobs, run_symbolic(jobs, workers, timeout_s)))
    for index, pred in slow:
        decided[index] = results[(pred, pairs[index][1].strip())]
    grades = []
    for (response, _), (answer, from_box), (correct, status) in zip(pairs, extracted, decided):
        grades.append(Grade(_reward(mode, correct, from_box, response), correct, answer, status))
    return grades


def grade(response: str, gold: str, mode: str = "correct", timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """One response; symbolic cases still run in a (single) killable worker."""
    return grade_batch([(response, gold)], mode, workers=1, timeout_s=timeout_s)[0]


__all__ = ["Grade", "MODES", "grade", "grade_batch", "shutdown", "worker_pids"]

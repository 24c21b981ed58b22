"""The math verifier: the rule reward of a response against a ground truth (docs/verifier.md).

    grade(response, gold, mode="correct") -> Grade
    grade_batch(pairs, mode, workers, timeout_s) -> list[Grade]   # always completes

Extraction (extract.py) and the sympy-free tiers (equivalence.py) run in the calling process; the rest goes
to a pool of killable worker processes with a hard time bound (pool.py), which run symbolic.py. `start`
starts the pool ahead of need, `shutdown` stops it. `python -m common.verifier` is the batch CLI.
"""
from __future__ import annotations

import logging
import typing
from dataclasses import dataclass

from common.config import RewardMode
from common.verifier.equivalence import decide
from common.verifier.extract import extract_answer, has_think_answer_format
from common.verifier.pool import run_symbolic, shutdown, start
from common.verifier.status import ERROR, STATUSES, Verdict, error_verdict

MODES: tuple[str, ...] = typing.get_args(RewardMode)  # the config's choices (score.reward_mode)
DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 5.0
# The card's reward: 0.67 for a correct boxed answer, 0.33 for the <think>...<answer> format.
DEEPSCALER_CORRECT, DEEPSCALER_FORMAT = 0.67, 0.33
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool
    extracted_answer: str | None
    status: str  # ok | no_answer | timeout | parse_error | error (status.py says which is which)
    error: str | None = None  # for status "error": the exception's type and message


def _reward(mode: str, correct: bool, from_box: bool, response: str) -> float:
    if mode == "correct":
        return float(correct)
    reward = DEEPSCALER_CORRECT if correct and from_box else 0.0
    if has_think_answer_format(response):
        reward += DEEPSCALER_FORMAT
    return round(reward, 4)


def _warn_about_errors(pairs: list[tuple[str, str]], grades: list[Grade]) -> None:
    """One warning line per distinct error of this call, with how many answers it hit and the first of them."""
    seen: dict[str, list[int]] = {}  # error -> [count, index of the first answer]
    for index, g in enumerate(grades):
        if g.status == ERROR:
            seen.setdefault(g.error or "unknown error", [0, index])[0] += 1
    for error, (count, index) in seen.items():
        response, gold = pairs[index]
        answer = grades[index].extracted_answer
        _LOG.warning("verifier bug (status 'error', graded incorrect) on %d of %d answers, e.g. answer %.80r against gold "
                     "%.80r: %s", count, len(grades), answer if answer is not None else response[-80:], gold, error)


def grade_batch(pairs: list[tuple[str, str]], mode: str = "correct", workers: int = DEFAULT_WORKERS,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Grade]:
    """Grade (response, gold) pairs, in order. Fast-path answers never leave this process.

    Always completes: an exception in our own code grades that answer `error` (and is logged), not the batch.
    """
    if mode not in MODES:
        raise ValueError(f"reward mode '{mode}' is not one of {', '.join(MODES)}")
    verdicts: list[Verdict | None] = []
    extracted: list[tuple[str | None, bool]] = []
    slow: list[tuple[int, str]] = []  # (index, the pred a worker should parse)
    for index, (response, gold) in enumerate(pairs):
        answer, from_box = None, False
        try:
            answer, status, from_box = extract_answer(response)
            outcome = Verdict(False, status) if answer is None else decide(answer, gold.strip())
        except Exception as error:  # a bug of ours: visible as `error`, never a silent parse_error
            outcome = error_verdict(error)
        extracted.append((answer, from_box))
        verdicts.append(outcome if isinstance(outcome, Verdict) else None)
        if not isinstance(outcome, Verdict):
            slow.append((index, outcome))
    # Identical (pred, gold) pairs are graded once: the samples of a prompt often agree.
    jobs = list(dict.fromkeys((pred, pairs[index][1].strip()) for index, pred in slow))
    results = dict(zip(jobs, run_symbolic(jobs, workers, timeout_s)))
    for index, pred in slow:
        verdicts[index] = results[(pred, pairs[index][1].strip())]
    grades = []
    for (response, _), (answer, from_box), verdict in zip(pairs, extracted, verdicts):
        assert verdict is not None
        grades.append(Grade(_reward(mode, verdict.equal, from_box, response), verdict.equal, answer, verdict.status,
                            verdict.error))
    _warn_about_errors(pairs, grades)
    return grades


def grade(response: str, gold: str, mode: str = "correct", timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """One response; symbolic cases still run in a (single) killable worker."""
    return grade_batch([(response, gold)], mode, workers=1, timeout_s=timeout_s)[0]


__all__ = ["ERROR", "Grade", "MODES", "STATUSES", "grade", "grade_batch", "shutdown", "start"]

"""Rule reward for the walking skeleton: the last balanced \\boxed{...} compared as an integer.

Deliberately small. It never grades the whole text: no box, or an unbalanced (truncated) box, is
`no_answer`. The full math verifier (LaTeX normalisation, symbolic equality, killable workers)
replaces `grade` behind the same signature.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_INTEGER = re.compile(r"[+-]?\d+(?:\.0+)?")


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool
    extracted_answer: str | None
    status: str  # ok | no_answer | parse_error


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...}, or None when there is none or it is cut off."""
    starts = [(text.rfind(opener), opener) for opener in _BOX_OPENERS]
    start, opener = max(starts)
    if start < 0:
        return None
    depth, begin = 1, start + len(opener)
    for pos in range(begin, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:pos].strip()
    return None


def _as_integer(answer: str) -> int | None:
    cleaned = answer.replace(",", "").replace(" ", "").strip("$")
    if not _INTEGER.fullmatch(cleaned):
        return None
    return int(cleaned.split(".")[0])


def grade(response: str, ground_truth: str) -> Grade:
    answer = extract_boxed(response)
    if answer is None:
        return Grade(0.0, False, None, "no_answer")
    predicted, gold = _as_integer(answer), _as_integer(ground_truth)
    if predicted is None or gold is None:
        correct = answer == ground_truth.strip()
        return Grade(float(correct), correct, answer, "ok" if correct else "parse_error")
    correct = predicted == gold
    return Grade(float(correct), correct, answer, "ok")

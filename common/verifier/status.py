"""The status of a grade: ok | no_answer | timeout | parse_error | error (docs/verifier.md, "Statuses").

`parse_error` is a property of the text (it cannot be read: an empty or over-long box, a `guard` rejection,
no parse from math-verify); `error` is an exception that reached our own code (a bug of ours, or a worker
that died), never a verdict on the answer. Every status but `ok` grades the answer incorrect.
"""
from __future__ import annotations

from typing import NamedTuple

OK, NO_ANSWER, TIMEOUT, PARSE_ERROR, ERROR = "ok", "no_answer", "timeout", "parse_error", "error"
STATUSES = (OK, NO_ANSWER, TIMEOUT, PARSE_ERROR, ERROR)
MAX_ERROR_CHARS = 300


class Verdict(NamedTuple):
    equal: bool
    status: str
    error: str | None = None  # for ERROR: the exception's type and message


def describe(error: BaseException) -> str:
    """`TypeError: message`, cut to MAX_ERROR_CHARS (a message may quote a whole answer)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def error_verdict(error: BaseException) -> Verdict:
    return Verdict(False, ERROR, describe(error))

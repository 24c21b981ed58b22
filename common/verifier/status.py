"""The status of a grade, and where the line between `parse_error` and `error` runs.

- `ok`: the answer was graded (correct or not).
- `no_answer`: the response has no final answer (no box and no `Answer:` line, or its last box is cut off).
- `timeout`: the symbolic tier ran past the time bound; its worker was killed.
- `parse_error`: the answer (or the gold) cannot be read, a property of the text: an empty or over-long
  box, a form `guard` rejects before sympy (power towers, huge exponents or factorials, over-long or
  deeply nested answers), or math-verify's parser returns no parse. math-verify catches what its parser
  (latex2sympy, ANTLR, sympy) raises on odd LaTeX and returns no parse (or keeps the text, which it then
  compares as a string). Our two hooks inside that parser (symbolic.use_two_stage_parsing) record
  their own exceptions, which are re-raised as ours rather than lost in math-verify's "no parse".
- `error`: an exception reached the verifier's own code: our tiers (extraction, the exact and simple
  forms, relations.py, the glue around math-verify, including sympy calls we make on its parses) or the
  pool (a worker that died, a pool that broke). It says nothing about the answer, so it is never folded
  into `parse_error`: the grade carries the exception's type and message (`Grade.error`), `grade_batch`
  logs one warning line per distinct error, and the pipeline counts it. It grades the answer incorrect,
  as every status but `ok` does (deepscaler's format reward still counts).
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

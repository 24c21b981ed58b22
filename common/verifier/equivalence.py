"""Is an extracted answer equal to the gold? The tiers that need no sympy, run in the calling process.

`normalize` strips LaTeX noise; `fast_equal` compares integers, plain decimals and bare lists of them
exactly as Fractions (this decides almost every DAPO response); `guard` keeps power towers, huge exponents
and over-long answers from sympy; `decide` also grades the number prose ends on and the \\frac{2}{4} rule.
What none of these decides goes to a worker (pool.py), which runs symbolic.py.
"""
from __future__ import annotations

import re
from fractions import Fraction
from math import gcd

from common.verifier.status import OK, PARSE_ERROR, Verdict

MAX_SYMBOLIC_CHARS = 600   # longer answers are not parsed (string equality still applies)
MAX_EXPONENT = 10_000      # |n| in x^n; larger powers are rejected before any symbolic work
MAX_FACTORIAL = 5_000

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_INTEGER = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:[, ]\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|boldsymbol|operatorname)\s*\{([^{}]*)\}")
_NAME = r"\\?[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?"
# `x =`, and a ratio of names such as `V_1 : V_2 =` (the gold states which ratio the number is)
_VARIABLE_PREFIX = re.compile(rf"^{_NAME}(?:\s*:\s*{_NAME})*\s*(?:=|\\approx)\s*")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_SPACING = re.compile(r"\\[,;: ]|\\quad|\\qquad|~")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_DELIMITERS = ("$", "\\(", "\\[")
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")
_PROSE_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_INT_FRACTION = re.compile(r"\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_BARE_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def normalize(answer: str) -> str:
    """Strip the LaTeX noise that does not change a value: wrappers, sizing, degrees, %, `x =`, `a:b =`, $."""
    s = _unbox(answer.strip())
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\displaystyle", "").replace("\\$", "").replace("$", "").replace("{,}", ",")
    s = _SPACING.sub(" ", s.replace("\\!", ""))
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    if s.count("=") == 1 or "\\approx" in s:
        s = _VARIABLE_PREFIX.sub("", s, count=1)
    return " ".join(s.split())


def _unbox(s: str) -> str:
    """`\\boxed{X}` (the whole answer) -> X, repeatedly."""
    while True:
        match = _BARE_BOX.match(s)
        if not match or not s.endswith("}"):
            return s
        depth = 0
        for position in range(match.end() - 1, len(s)):
            depth += {"{": 1, "}": -1}.get(s[position], 0)
            if depth == 0:
                break
        if position != len(s) - 1:
            return s
        s = s[match.end() : -1].strip()


def _number_list(s: str) -> list[Fraction] | None:
    """`10, 4, -2` (a bare list of plain numbers, read in order) or None."""
    if "," not in s or any(c in s for c in "()[]{}"):
        return None
    items = [as_number(item.strip()) for item in s.split(",")]
    return items if len(items) > 1 and all(item is not None for item in items) else None


def as_number(s: str, comma_is_decimal: bool = False) -> Fraction | None:
    """An integer or plain decimal (thousands separators allowed) as an exact Fraction, else None."""
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    if _THOUSANDS.fullmatch(s) and (" " in s) != ("," in s):
        return Fraction(s.replace(",", "").replace(" ", ""))
    if comma_is_decimal and _DECIMAL_COMMA.fullmatch(s):
        return Fraction(s.replace(",", "."))
    return None


def fast_equal(pred: str, gold: str) -> bool | None:
    """Exact comparison when both sides are plain numbers; None when symbolic work is needed.

    A comma between digits is a thousands separator (1,000); it is read as a decimal comma (1,22)
    only when the other side is a decimal with a point, which is the only reading that can match.
    """
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(gold):
        return int(pred) == int(gold)
    pred, gold = normalize(pred), normalize(gold)
    if pred == gold and pred:
        return True
    gold_number, pred_number = as_number(gold), as_number(pred)
    if gold_number is None and pred_number is not None and "." in pred:
        gold_number = as_number(gold, comma_is_decimal=True)
    if pred_number is None and gold_number is not None and "." in gold:
        pred_number = as_number(pred, comma_is_decimal=True)
    if gold_number is not None and pred_number is not None:
        return gold_number == pred_number
    # Bare lists of numbers are ordered, as in the MATH grader: "10, 4, -2" is not "4, 10, -2".
    gold_list, pred_list = _number_list(gold), _number_list(pred)
    if gold_list is not None and pred_list is not None:
        return gold_list == pred_list
    return None


def _exponent_groups(s: str):
    """Yield the text of every exponent: `^{...}` (balanced) or the single token after `^`."""
    position = s.find("^")
    while position >= 0:
        cursor = position + 1
        while cursor < len(s) and s[cursor] == " ":
            cursor += 1
        if cursor < len(s) and s[cursor] == "{":
            depth, end = 0, cursor
            while end < len(s):
                depth += {"{": 1, "}": -1}.get(s[end], 0)
                if depth == 0:
                    break
                end += 1
            yield s[cursor + 1 : end], end + 1
        else:
            match = re.compile(r"\\?[A-Za-z]+|\d+|.").match(s, cursor)
            yield (match.group() if match else ""), (match.end() if match else cursor)
        position = s.find("^", position + 1)


def guard(answer: str) -> str | None:
    """Why this answer must not reach sympy (power tower, huge exponent or factorial, too long), or None."""
    if len(answer) > MAX_SYMBOLIC_CHARS and not is_prose(answer):
        return "answer too long"  # prose is only searched for its final formula, never parsed whole
    if "\\uparrow" in answer or ("**" in answer and not is_prose(answer)):
        return "power tower"
    for exponent, end in _exponent_groups(answer):
        if "^" in exponent or answer[end : end + 1] == "^" or answer[end : end + 2] in ("{^", "}^"):
            return "power tower"
        digits = re.sub(r"[^0-9]", "", exponent)
        if len(digits) > 5 or (digits and int(digits) > MAX_EXPONENT and re.fullmatch(r"[-+]?\d+", exponent.strip())):
            return "exponent too large"
        if re.search(r"\d{6,}", exponent):
            return "exponent too large"
    for factorial in _FACTORIAL.finditer(answer):
        if len(factorial.group(1)) > 5 or int(factorial.group(1)) > MAX_FACTORIAL:
            return "factorial too large"
    if answer.count("{") > 200:
        return "answer too deeply nested"
    return None


def is_prose(s: str) -> bool:
    """Text with boxes, `$`/`\\(`/`\\[` formulas or words: math-verify extracts the final formula from it."""
    return "\\boxed" in s or "\\fbox" in s or any(d in s for d in _DELIMITERS) or bool(_PROSE.search(s))


def final_number(answer: str) -> str | None:
    """For prose: a plain number (or a/b) written after its last formula ("the largest $n$ is 34"), else None."""
    if not is_prose(answer) or "\\boxed" in answer or "\\fbox" in answer:
        return None
    numbers = list(_PROSE_NUMBER.finditer(answer))
    closers = ("$", "\\)", "\\]") if answer.count("$") >= 2 else ("\\)", "\\]")  # a lone $ is money
    formula_end = max(answer.rfind(d) for d in closers)
    if not numbers or numbers[-1].start() < formula_end:
        return None
    return numbers[-1].group().rstrip(",")


def _fraction_text(number: str) -> str:
    """`2/3` -> `\\frac{2}{3}`, so that a/b from prose compares as a fraction."""
    if "/" not in number:
        return number
    a, b = (part.strip() for part in number.split("/", 1))
    return f"\\frac{{{a}}}{{{b}}}"


def _unreduced_fraction(pred: str, gold: str) -> bool:
    """A PRM800K-style rule kept by the public cases: \\frac{2}{4} is not an answer for 1/2."""
    gold = normalize(gold)
    for match in _INT_FRACTION.finditer(normalize(pred)):
        a, b = int(match.group(1)), int(match.group(2))
        if b and a % b and gcd(a, b) > 1 and match.group() not in gold:
            return True
    return False


def decide(answer: str, gold: str) -> Verdict | str:
    """A verdict without sympy, or the pred a worker must grade symbolically (prose gives the number it ends on).

    Cheap and bounded (regexes and Fractions), so the calling process runs it on every answer.
    """
    equal = fast_equal(answer, gold)
    if equal is None and (number := final_number(answer)) is not None:
        answer = _fraction_text(number)  # grade the number the prose ends on, not the prose
        equal = fast_equal(answer, gold)
    if equal is not None:
        return Verdict(equal, OK)
    if guard(answer) or guard(gold):  # power towers and the like never reach a worker
        return Verdict(False, PARSE_ERROR)
    if _unreduced_fraction(answer, gold):
        return Verdict(False, OK)
    return answer

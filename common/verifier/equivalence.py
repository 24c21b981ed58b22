"""Is an extracted answer equal to the gold? The tiers that need no sympy, run in the calling process.

Tiers, cheapest first:
1. `normalize` strips LaTeX noise; identical strings are equal.
2. `fast_equal`: integers and plain decimals compare exactly as Fractions (50 != 0.5, 1000.0 == 1000),
   with no sympy; this decides almost every DAPO response in the calling process.
3. `decide`: also without sympy, in the calling process: the number prose ends on, the
   \frac{2}{4} rule, and `simple_equal` for a few regex-recognised exact forms (\frac{a}{b}, a/b,
   a\\sqrt{n}, \frac{a\\pi}{b}, and bracketed lists of them with the same brackets).
4. `guard` rejects power towers, huge exponents and over-long answers before anything reaches sympy.
What none of these decides goes to a worker process (pool.py), which runs symbolic.py: relations.py,
then math-verify.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from math import gcd
from typing import NamedTuple

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


# --- simple exact forms (tier 3) ---------------------------------------------------------------
# A value is (coefficient, kind, decimal): coefficient * 1, * pi or * sqrt(kind) with `kind` a
# square-free integer > 1. Distinct kinds are never equal (pi is transcendental, square roots of
# distinct square-free integers are linearly independent over Q), so equality is exact.
# `decimal` marks a value written with a decimal point: math-verify compares those after
# rounding (0.333333 == 1/3), so a decimal is only ever decided equal here, never unequal,
# unless both sides are plain numbers (the fast_equal policy: 50 != 0.5).
MAX_RADICAND = 10**6
_MONOMIAL = re.compile(r"([+-]?)\s*(\d+(?:\.\d+)?|\.\d+)?\s*(?:\\sqrt\s*(?:\{\s*(\d+)\s*\}|(\d))|(\\pi))?")
_FRAC = re.compile(r"([+-]?)\s*\\frac\s*(?:\{((?:[^{}]|\{[^{}]*\})*)\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(\\pi|\\sqrt\s*(?:\{\s*\d+\s*\}|\d))?")
_SLASH = re.compile(r"([+-]?)\s*(\d+)\s*/\s*(\d+)")
_BRACKETS = {"(": ")", "[": "]", "\\{": "\\}"}

class Value(NamedTuple):
    coefficient: Fraction
    kind: str        # "1", "pi" or a square-free radicand
    decimal: bool    # written with a decimal point
    plain: bool      # a bare number (no \\frac, \\sqrt, \\pi, /)


def _monomial(s: str) -> Value | None:
    """`-3`, `2.5`, `\\sqrt{8}`, `2\\sqrt 3`, `\\pi`, `3\\pi` as a Value; else None."""
    match = _MONOMIAL.fullmatch(s.strip())
    if not match or not (match.group(2) or match.group(3) or match.group(4) or match.group(5)):
        return None
    sign, number, radicand = match.group(1), match.group(2), match.group(3) or match.group(4)
    coefficient = Fraction(number) if number else Fraction(1)
    if sign == "-":
        coefficient = -coefficient
    decimal = bool(number) and "." in number
    if match.group(5):
        return Value(coefficient, "pi", decimal, False)
    if radicand is None:
        return Value(coefficient, "1", decimal, True)
    n = int(radicand)
    if n > MAX_RADICAND:
        return None
    root = 2
    while root * root <= n:  # pull square factors out: sqrt(8) = 2 sqrt(2)
        while n % (root * root) == 0:
            n //= root * root
            coefficient *= root
        root += 1
    if n == 0:
        return Value(Fraction(0), "1", decimal, False)
    return Value(coefficient, ("1" if n == 1 else str(n)), decimal, False)


def simple_value(s: str) -> Value | None:
    """An exact value for a monomial, `\\frac{monomial}{n}` (optionally times pi or a square root) or `a/b`."""
    if match := _FRAC.fullmatch(s):
        numerator = _monomial(match.group(2) if match.group(2) is not None else match.group(3))
        denominator = int(match.group(4) or match.group(5))
        factor = _monomial(match.group(6)) if match.group(6) else Value(Fraction(1), "1", False, True)
        if numerator is None or factor is None or denominator == 0:
            return None
        if numerator.kind != "1" and factor.kind != "1":
            return None  # a product of two surds is not worth a rule here
        coefficient = numerator.coefficient * factor.coefficient / denominator
        if match.group(1) == "-":
            coefficient = -coefficient
        kind = "1" if coefficient == 0 else numerator.kind if numerator.kind != "1" else factor.kind
        return Value(coefficient, kind, numerator.decimal, False)
    if match := _SLASH.fullmatch(s):
        if int(match.group(3)) == 0:
            return None
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return Value(-value if match.group(1) == "-" else value, "1", False, False)
    value = _monomial(s)
    if value is not None and value.coefficient == 0:
        return value._replace(kind="1")  # 0 pi == 0
    return value


def _values_equal(a: Value, b: Value) -> bool | None:
    same = (a.coefficient, a.kind) == (b.coefficient, b.kind)
    if same or not (a.decimal or b.decimal) or (a.plain and b.plain):
        return same
    return None  # a decimal against a fraction or a surd: math-verify's rounding decides (1/3 == 0.333333)


def _approximate(value: Value) -> float:
    factor = 1.0 if value.kind == "1" else math.pi if value.kind == "pi" else math.sqrt(int(value.kind))
    return float(value.coefficient) * factor


def _split_top(s: str) -> list[str] | None:
    """Split on commas outside braces; None when there are brackets inside (nested lists)."""
    items, depth, start = [], 0, 0
    for position, char in enumerate(s):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char in "()[]" and depth == 0:
            return None
        elif char == "," and depth == 0:
            items.append(s[start:position])
            start = position + 1
    items.append(s[start:])
    return items


def _bracketed(s: str) -> tuple[str, str, list[Value]] | None:
    """`(a, b)`, `[a, b)`, `\\{a, b\\}` of simple values -> (open, close, values); else None."""
    opener = next((o for o in _BRACKETS if s.startswith(o)), None)
    closer = next((c for c in (")", "]", "\\}") if s.endswith(c)), None)
    if opener is None or closer is None or len(s) < len(opener) + len(closer):
        return None
    items = _split_top(s[len(opener) : len(s) - len(closer)])
    if not items:
        return None
    values = [simple_value(item.strip()) for item in items]
    return (opener, closer, values) if all(v is not None for v in values) else None  # type: ignore[return-value]


def simple_equal(pred: str, gold: str) -> bool | None:
    """Exact comparison of the simple forms above; None when either side is anything else.

    Bracketed lists follow math-verify's readings, and are left to it where those are ambiguous:
    (1,2) and [1,2] are different intervals, but (1,2,3) and [1,2,3] the same list and (1,2) the
    set {1,2}; (2,1) may be a tuple or an empty interval (and all empty intervals are equal).
    Braces \\{\\} are sets (order and repeats do not matter); other brackets compare in order.
    """
    pred, gold = normalize(pred), normalize(gold)
    a, b = simple_value(pred), simple_value(gold)
    if a is not None and b is not None:
        return _values_equal(a, b)
    p, g = _bracketed(pred), _bracketed(gold)
    if p is None or g is None:
        return None
    if "\\{" in (p[0], g[0]):
        if p[0] != g[0] or any(v.decimal for v in p[2] + g[2]):
            return None
        return {v[:2] for v in p[2]} == {v[:2] for v in g[2]}
    results = [_values_equal(x, y) for x, y in zip(p[2], g[2])] if len(p[2]) == len(g[2]) else [False]
    if p[:2] == g[:2] and all(r is True for r in results):
        return True  # the same brackets around the same values: equal under every reading
    if any(len(values) == 2 and _approximate(values[0]) >= _approximate(values[1]) for values in (p[2], g[2])):
        return None
    if p[:2] != g[:2]:
        return False if len(p[2]) == len(g[2]) == 2 else None  # two proper intervals with other ends
    return None if None in results else all(results)


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


def decide(pred: str, gold: str) -> tuple[str, tuple[bool, str] | None]:
    """Everything before sympy: (the pred to parse, (equal, status) or None when symbolic work is needed).

    Cheap and bounded (regexes and Fractions), so the calling process runs it and only undecided
    answers travel to a worker; prose is replaced by the number it ends on.
    """
    fast = fast_equal(pred, gold)
    if fast is None and (pred_number := final_number(pred)) is not None:
        pred = _fraction_text(pred_number)  # grade the number the prose ends on, not the prose
        fast = fast_equal(pred, gold)
    if fast is not None:
        return pred, (fast, "ok")
    if guard(pred) or guard(gold):
        return pred, (False, "parse_error")
    if _unreduced_fraction(pred, gold):
        return pred, (False, "ok")
    simple = simple_equal(pred, gold)
    return pred, (None if simple is None else (simple, "ok"))



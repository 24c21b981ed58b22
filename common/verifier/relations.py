"""Exact, sympy-free comparison of polynomial equations and inequalities, and of an inequality with an interval.

Relations cost the most of all answers in math-verify (simplify, solve, as_set: 50-200 ms each),
yet the common ones are polynomials with rational coefficients, which compare exactly with
Fractions: `p = 0` and `q = 0` have the same solutions when p = c*q (c != 0), and two distinct
linear relations never do. The workers run this before math-verify's parser, on the very text that
parser would read (math-verify's own LaTeX normalisation of the extracted formula). A decision is
made only where it is both mathematically right and what math-verify answers; everything else
returns None and goes to math-verify. Known differences, therefore left to math-verify:
- `2x < 10` vs `x < 5`: the same set, but math-verify compares inequalities only up to a factor
  of +-1 (and flips), so only those are decided equal;
- `x^2 = 4` vs `2x^2 = 8`: math-verify's solve path fails for one variable, so one-variable
  equations are decided equal only up to a factor of +-1;
- `X + 1 = 0`: math-verify lower-cases symbols; `e` and `i` are constants to it; `f(x)`, `xy`,
  decimals, `1/2x`, a trailing unit (`3t`, which its normaliser drops): readings we do not make.
A differential test against math-verify on generated relations guards all of this. The input is
bounded (length, degree, number of terms), so a decision costs well under a millisecond.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from fractions import Fraction

from latex2sympy2_extended.math_normalization import normalize_latex
from math_verify import LatexExtractionConfig

from common.verifier.equivalence import Value, is_prose, normalize, simple_value

MAX_CHARS = 200
MAX_DEGREE = 8
MAX_TERMS = 64

Monomial = tuple[tuple[str, int], ...]  # sorted (variable, power) pairs; () is the constant term
Poly = dict[Monomial, Fraction]

_WRAPPERS = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z])|\\([A-Za-z]+)|(.))")
_SUBSCRIPT = re.compile(r"_(?:([A-Za-z0-9])|\{([A-Za-z0-9]+)\})")
_RELATIONS = {"=": "=", "<": "<", ">": ">", "≤": "<=", "≥": ">=", "lt": "<", "gt": ">", "le": "<=", "leq": "<=",
              "leqslant": "<=", "ge": ">=", "geq": ">=", "geqslant": ">="}
_PRODUCTS = {"cdot", "times"}


_NORMALIZATION = LatexExtractionConfig().normalization_config  # what parse_answer's math_verify.parse applies
_NO_UNITS = replace(_NORMALIZATION, units=False)


def formula(answer: str) -> str | None:
    """The text math-verify's LaTeX parser would read for this answer; None when that is not clear.

    parse_answer hands a bare answer over as `$normalize(answer)$` (which drops a leading `x =`); an
    answer that is exactly one `$...$` (or `\\(...\\)`, `\\[...\\]`) is read inside it. math-verify
    then normalises that text; where the normalisation drops a trailing "unit" (`6y + 3t` -> `6y + 3`),
    its reading is not the answer's, so nothing is decided here.
    """
    answer = answer.strip()
    if not is_prose(answer):
        inner = normalize(answer)
    else:
        inner = None
        for opener, closer in _WRAPPERS:
            if answer.startswith(opener) and answer.endswith(closer) and len(answer) > len(opener) + len(closer):
                inner = answer[len(opener) : len(answer) - len(closer)]
                break
        if inner is None or "$" in inner or "\\(" in inner or "\\[" in inner or "boxed" in inner or is_prose(inner):
            return None
    if len(inner) > MAX_CHARS:
        return None
    text = normalize_latex(inner, _NORMALIZATION)
    return text if text == normalize_latex(inner, _NO_UNITS) else None


# --- polynomials ---------------------------------------------------------------------------------

def _add(a: Poly, b: Poly, sign: int = 1) -> Poly:
    out = dict(a)
    for monomial, coefficient in b.items():
        out[monomial] = out.get(monomial, Fraction(0)) + sign * coefficient
    return {m: c for m, c in out.items() if c}


def _mul(a: Poly, b: Poly) -> Poly | None:
    out: dict[Monomial, Fraction] = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            powers = dict(ma)
            for variable, power in mb:
                powers[variable] = powers.get(variable, 0) + power
            monomial = tuple(sorted(powers.items()))
            out[monomial] = out.get(monomial, Fraction(0)) + ca * cb
    out = {m: c for m, c in out.items() if c}
    if len(out) > MAX_TERMS or degree(out) > MAX_DEGREE:
        return None
    return out


def degree(p: Poly) -> int:
    return max((sum(power for _, power in m) for m in p), default=0)


def variables(p: Poly) -> set[str]:
    return {variable for m in p for variable, _ in m}


def _constant(p: Poly) -> Fraction | None:
    return p.get((), Fraction(0)) if all(m == () for m in p) else None


def ratio(a: Poly, b: Poly) -> Fraction | None:
    """c with a == c * b, else None (both nonzero)."""
    if not a or not b or a.keys() != b.keys():
        return None
    first = next(iter(b))
    c = a[first] / b[first]
    return c if all(a[m] == c * b[m] for m in b) else None


class _Declined(Exception):
    """Not a form this module reads exactly: leave the answer to math-verify."""


def _tokens(text: str) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise _Declined
        position = match.end()
        digits, letter, command, char = match.groups()
        if digits is not None:
            if text[position : position + 1] in (".", ","):  # decimals and 1,000: math-verify's readings
                raise _Declined
            out.append(("num", digits))
        elif letter is not None:
            # Upper case (math-verify lower-cases it), e and i (constants), runs of letters (words,
            # function names) and a letter before "(" (a function call, f(x)): not read here.
            if letter.isupper() or letter in "ei" or text[position : position + 1].isalpha():
                raise _Declined
            name = letter
            sub = _SUBSCRIPT.match(text, position)
            if sub:
                name, position = f"{letter}_{sub.group(1) or sub.group(2)}", sub.end()
            if text[position:].lstrip().startswith("(") or text[position : position + 1].isalpha():
                raise _Declined
            out.append(("var", name))
        elif command is not None:
            if command in _RELATIONS:
                out.append(("rel", _RELATIONS[command]))
            elif command in _PRODUCTS:
                out.append(("op", "*"))
            elif command == "frac":
                out.append(("frac", None))
            else:
                raise _Declined
        elif char in "=<>≤≥":
            out.append(("rel", _RELATIONS[char]))
        elif char in "+-*/^(){}":
            out.append(("op", char))
        else:
            raise _Declined
    return out


class _Parser:
    """Recursive descent over: expr (rel expr)?; expr = [+-] term ([+-] term)*; term = factor ([*/]? factor)*;
    factor = base [^ digit | ^{integer}]; base = number | variable | (expr) | {expr} | \\frac{expr}{constant}."""

    def __init__(self, tokens: list[tuple[str, object]]):
        self.tokens, self.position = tokens, 0

    def peek(self) -> tuple[str, object] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str, value: object = None) -> object:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            raise _Declined
        self.position += 1
        return token[1]

    def expr(self) -> Poly:
        sign = 1
        token = self.peek()
        if token in (("op", "+"), ("op", "-")):
            sign = -1 if token[1] == "-" else 1
            self.position += 1
        total = _add({}, self.term(), sign)
        while (token := self.peek()) in (("op", "+"), ("op", "-")):
            self.position += 1
            total = _add(total, self.term(), -1 if token[1] == "-" else 1)
        return total

    def term(self) -> Poly:
        product = self.factor()
        after_division = False
        while True:
            token = self.peek()
            if token in (("op", "*"), ("op", "/")):
                self.position += 1
                factor = self.factor()
                if token[1] == "/":
                    divisor = _constant(factor)
                    if not divisor:
                        raise _Declined  # division by a variable or by zero
                    factor, after_division = {(): 1 / divisor}, True
                else:
                    after_division = False
            elif token is not None and (token[0] in ("var", "frac") or token in (("op", "("), ("op", "{"))):
                if after_division:
                    raise _Declined  # 1/2x: (1/2)x or 1/(2x)? math-verify's reading is not ours to guess
                factor = self.factor()
            else:
                return product
            product = _mul(product, factor)
            if product is None:
                raise _Declined

    def factor(self) -> Poly:
        base = self.base()
        if self.peek() != ("op", "^"):
            return base
        self.position += 1
        if self.peek() == ("op", "{"):
            self.position += 1
            exponent = str(self.take("num"))
            self.take("op", "}")
        else:
            exponent = str(self.take("num"))
            if len(exponent) != 1:
                raise _Declined  # x^23 is x^2 * 3 in LaTeX
        power = int(exponent)
        if power > MAX_DEGREE or self.peek() == ("op", "^"):
            raise _Declined
        result: Poly | None = {(): Fraction(1)}
        for _ in range(power):
            result = _mul(result, base)
            if result is None:
                raise _Declined
        return result

    def base(self) -> Poly:
        kind, value = self.peek() or (None, None)
        self.position += 1
        if kind == "num":
            if self.peek() is not None and self.peek()[0] == "num":
                raise _Declined
            return {(): Fraction(int(value))} if int(value) else {}
        if kind == "var":
            return {((value, 1),): Fraction(1)}
        if (kind, value) in (("op", "("), ("op", "{")):
            inner = self.expr()
            self.take("op", ")" if value == "(" else "}")
            return inner
        if kind == "frac":
            self.take("op", "{")
            numerator = self.expr()
            self.take("op", "}")
            self.take("op", "{")
            denominator = _constant(self.expr())
            self.take("op", "}")
            if not denominator:
                raise _Declined
            return {m: c / denominator for m, c in numerator.items()}
        raise _Declined


def relation(text: str) -> tuple[Poly, str] | None:
    """`lhs rel rhs` as (p, kind) with kind "=", "<" or "<=" and the relation `p kind 0`; None when not read."""
    if len(text) > MAX_CHARS:
        return None
    try:
        tokens = _tokens(text)
        if sum(kind == "rel" for kind, _ in tokens) != 1:
            return None
        parser = _Parser(tokens)
        lhs = parser.expr()
        kind = parser.take("rel")
        rhs = parser.expr()
        if parser.peek() is not None:
            return None
    except _Declined:
        return None
    if kind in (">", ">="):
        return _add(rhs, lhs, -1), kind.replace(">", "<")
    return _add(lhs, rhs, -1), str(kind)


def relations_equal(pred: str, gold: str) -> bool | None:
    """Two polynomial relations, decided exactly where math-verify agrees (see the module docstring)."""
    p, g = relation(pred), relation(gold)
    if p is None or g is None:
        return None
    (p_poly, p_kind), (g_poly, g_kind) = p, g
    if _constant(p_poly) is not None or _constant(g_poly) is not None:
        return None  # 1 = 1, 0 < 1: no variable left
    c = ratio(p_poly, g_poly)
    linear = degree(p_poly) == 1 and degree(g_poly) == 1
    if p_kind == g_kind == "=":
        if c is not None and (abs(c) == 1 or len(variables(g_poly)) >= 2):
            return True  # the same solutions; math-verify: equal differences, or its solve over >= 2 variables
        return False if linear and c is None else None  # two distinct hyperplanes
    if "=" in (p_kind, g_kind):
        return None
    if linear:
        if c is None or c < 0 or p_kind != g_kind:
            return False  # other or opposite half-spaces, or the same one open and closed
        return True if c == 1 else None
    return True if p_kind == g_kind and c == 1 else None


# --- an inequality against an interval -----------------------------------------------------------

_INEQUALITY = re.compile(r"\\leqslant|\\geqslant|\\leq|\\geq|\\le(?![a-z])|\\ge(?![a-z])|\\lt|\\gt|<|>|≤|≥")
_VARIABLE = re.compile(r"[a-df-hj-z](?:_(?:[A-Za-z0-9]|\{[A-Za-z0-9]+\}))?")
_INFINITY = re.compile(r"([+-]?)\s*\\infty")
_MEMBER = re.compile(r"(.+?)\s*\\in(?![a-z])\s*(.+)")  # \in, not \infty

Bound = Value | float  # a Value, or +-math.inf


def _bound(text: str) -> Bound | None:
    text = text.strip()
    if match := _INFINITY.fullmatch(text):
        return -math.inf if match.group(1) == "-" else math.inf
    value = simple_value(text)
    return None if value is None or value.decimal else value  # decimals: math-verify rounds


def _number(bound: Bound) -> float:
    if isinstance(bound, float):
        return bound
    factor = 1.0 if bound.kind == "1" else math.pi if bound.kind == "pi" else math.sqrt(int(bound.kind))
    return float(bound.coefficient) * factor


def _less(a: Bound, b: Bound) -> bool | None:
    """a < b exactly for rationals and infinities; for surds and pi only when the floats are far apart."""
    if isinstance(a, float) or isinstance(b, float) or (a.kind == b.kind == "1"):
        if not isinstance(a, float) and not isinstance(b, float):
            return a.coefficient < b.coefficient
        return _number(a) < _number(b)
    x, y = _number(a), _number(b)
    if abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)):
        return None
    return x < y


def _same(a: Bound, b: Bound) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == b
    return (a.coefficient, a.kind) == (b.coefficient, b.kind)


Interval = tuple[Bound, bool, Bound, bool]  # (low, low open, high, high open)


def _inequality(text: str) -> tuple[str, Interval] | None:
    """`a < x <= b`, `x > a`, `b >= x`, ... over one variable -> (variable, interval); else None."""
    if len(text) > MAX_CHARS:
        return None
    operators = _INEQUALITY.findall(text)
    parts = [part.strip() for part in _INEQUALITY.split(text)]
    if len(operators) not in (1, 2):
        return None
    ups = {op in ("<", "\\lt", "\\le", "\\leq", "\\leqslant", "≤") for op in operators}
    strict = [op in ("<", ">", "\\lt", "\\gt") for op in operators]
    if len(ups) != 1:
        return None  # a < x > b
    up = ups.pop()
    if not up:  # b > x >= a  reads as  a <= x < b
        parts, strict = parts[::-1], strict[::-1]
    if len(parts) == 3:  # a < x < b, both ends finite
        low, variable, high = _bound(parts[0]), parts[1], _bound(parts[2])
        if low is None or high is None or isinstance(low, float) or isinstance(high, float):
            return None
        interval = (low, strict[0], high, strict[1])
    elif _VARIABLE.fullmatch(parts[0]):  # x < b
        variable, high = parts[0], _bound(parts[1])
        if high is None or isinstance(high, float):
            return None
        interval = (-math.inf, True, high, strict[0])
    else:  # a < x
        variable, low = parts[1], _bound(parts[0])
        if low is None or isinstance(low, float):
            return None
        interval = (low, strict[0], math.inf, True)
    return (variable, interval) if _VARIABLE.fullmatch(variable) else None


def _interval(text: str) -> tuple[str | None, Interval] | None:
    """`(a, b]`, `[a, \\infty)`, `x \\in (a, b)` -> (variable or None, interval); else None."""
    variable = None
    if match := _MEMBER.fullmatch(text):
        variable, text = match.group(1).strip(), match.group(2).strip()
        if not _VARIABLE.fullmatch(variable):
            return None
    if len(text) < 5 or text[0] not in "([" or text[-1] not in ")]" or text.count(",") != 1:
        return None
    low, high = (_bound(part) for part in text[1:-1].split(","))
    if low is None or high is None:
        return None
    low_open, high_open = text[0] == "(", text[-1] == ")"
    if (low == -math.inf and not low_open) or (high == math.inf and not high_open) or low == math.inf or high == -math.inf:
        return None  # [-\infty: not an interval of reals
    return variable, (low, low_open, high, high_open)


def interval_equal(pred: str, gold: str) -> bool | None:
    """A gold inequality over one variable against a predicted interval: the same set of reals?

    Only this direction: math-verify turns a gold relation into a set when the prediction is a set,
    but compares a gold set with a predicted relation as unequal, which we leave to it.
    """
    g, p = _inequality(gold), _interval(pred)
    if g is None or p is None:
        return None
    variable, gold_interval = g
    pred_variable, pred_interval = p
    if pred_variable is not None and pred_variable != variable:
        return None  # x \\in ... against y < ...: math-verify ignores the name; we do not decide
    for low, _, high, _ in (gold_interval, pred_interval):
        if _less(low, high) is not True:
            return None  # empty, a point, or too close to order
    (gl, glo, gh, gho), (pl, plo, ph, pho) = gold_interval, pred_interval
    return _same(gl, pl) and _same(gh, ph) and glo == plo and gho == pho


def relational_equal(pred: str, gold: str) -> bool | None:
    """The tiers of this module on the formulas math-verify would read; None when neither decides."""
    pred_formula, gold_formula = formula(pred), formula(gold)
    if pred_formula is None or gold_formula is None:
        return None
    decided = relations_equal(pred_formula, gold_formula)
    return decided if decided is not None else interval_equal(pred_formula, gold_formula)

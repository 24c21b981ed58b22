"""Relations, decided exactly on math-verify's own parses where its comparison is slow.

math-verify compares relations with simplify, solve and as_set (10-90 ms each), yet the common ones are
polynomials with rational coefficients, which sympy's Poly compares exactly in a fraction of a
millisecond: `p = 0` and `q = 0` have the same solutions when p = c*q, and two distinct linear
equations never do. A decision is made only where it is both mathematically right and math-verify's
own answer (tests check listed and generated relations against it); anything else is None, for
math-verify. Where the two differ, math-verify is followed: it compares inequalities only up to a
factor of +-1, and one-variable equations too (`x^2 = 4` is not `2x^2 = 8` to it).
"""
from __future__ import annotations

import sympy
from sympy.core.relational import Equality, GreaterThan, LessThan, Relational, StrictGreaterThan, StrictLessThan
from sympy.polys.polyerrors import BasePolynomialError

_KINDS = {Equality: "=", LessThan: "<=", StrictLessThan: "<", GreaterThan: ">=", StrictGreaterThan: ">"}
_FLIPPED = {">=": "<=", ">": "<"}


def _oriented(relation: Relational) -> tuple[sympy.Expr, sympy.Expr, str] | None:
    """(left, right, kind) with `>` and `>=` turned round into `<` and `<=`; None for other relations."""
    kind = _KINDS.get(type(relation))
    if kind is None or not all(isinstance(side, sympy.Expr) for side in relation.args) or relation.has(sympy.Float):
        return None  # decimals: math-verify rounds them (0.333 x = 1 against x = 3)
    left, right = relation.args
    return (right, left, _FLIPPED[kind]) if kind in _FLIPPED else (left, right, kind)


def _polynomial(expression: sympy.Expr, symbols: list[sympy.Symbol]) -> sympy.Poly | None:
    try:
        return sympy.Poly(expression, *symbols, domain="QQ")
    except BasePolynomialError:  # not a polynomial with rational coefficients (sin x, 1/x, e, i)
        return None


def polynomial_equal(gold: Relational, pred: Relational) -> bool | None:
    """Two polynomial equations, or two inequalities, with rational coefficients."""
    g, p = _oriented(gold), _oriented(pred)
    symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
    if g is None or p is None or not symbols or (g[2] == "=") != (p[2] == "="):
        return None
    a, b = _polynomial(g[0] - g[1], symbols), _polynomial(p[0] - p[1], symbols)
    if a is None or b is None or a.is_zero or b.is_zero:
        return None
    ratio = a.LC() / b.LC()
    proportional = (a - b * ratio).is_zero
    linear = a.total_degree() == b.total_degree() == 1
    if g[2] != "=":  # two linear inequalities hold on the same set only when one is the other times c > 0
        if g[2] == p[2] and proportional and ratio == 1:
            return True
        return False if linear and not (g[2] == p[2] and proportional and ratio > 0) else None
    if proportional and (abs(ratio) == 1 or (len(symbols) > 1 and max(a.total_degree(), b.total_degree()) <= 2)):
        return True
    return False if linear and not proportional else None


def _bounds(relation: sympy.Basic) -> tuple[sympy.Symbol, sympy.Interval] | None:
    """`s < c`, `c <= s`, or `a < s <= b` (an And of two such) as (s, the interval of s); else None."""
    parts = relation.args if isinstance(relation, sympy.And) else (relation,)
    symbol, interval = None, sympy.Interval(-sympy.oo, sympy.oo)
    for part in parts:
        oriented = _oriented(part) if isinstance(part, Relational) else None
        if oriented is None or oriented[2] == "=":
            return None
        left, right, kind = oriented
        if isinstance(left, sympy.Symbol) and right.is_number and right.is_extended_real:
            bound = sympy.Interval(-sympy.oo, right, right_open=kind == "<")
        elif isinstance(right, sympy.Symbol) and left.is_number and left.is_extended_real:
            bound = sympy.Interval(left, sympy.oo, left_open=kind == "<")
        else:
            return None
        variable = left if isinstance(left, sympy.Symbol) else right
        if symbol is not None and variable != symbol:
            return None
        symbol, interval = variable, interval.intersect(bound)
    return (symbol, interval) if isinstance(interval, sympy.Interval) else None


def _same_number(a: sympy.Expr, b: sympy.Expr) -> bool | None:
    if a.is_infinite or b.is_infinite:
        return a == b
    return (a - b).is_zero


def interval_equal(gold: sympy.Basic, pred: sympy.Basic) -> bool | None:
    """An interval (`[a, b)`, `x \\in [a, b)`) against an inequality gold in one variable (`a <= x < b`)."""
    bounds = _bounds(gold)
    if isinstance(pred, Equality) and isinstance(pred.rhs, sympy.Interval):  # x \in [a, b)
        if bounds is None or pred.lhs != bounds[0]:
            return None
        pred = pred.rhs
    if bounds is None or not isinstance(pred, sympy.Interval):
        return None
    interval = bounds[1]
    ends = [_same_number(interval.start, pred.start), _same_number(interval.end, pred.end)]
    if None in ends:
        return None
    return all(ends) and (interval.left_open, interval.right_open) == (pred.left_open, pred.right_open)


def relation_equal(gold: sympy.Basic, pred: sympy.Basic) -> bool | None:
    """Equal, unequal, or None (for math-verify), for math-verify's first parse of each side."""
    if not (isinstance(gold, sympy.Basic) and isinstance(pred, sympy.Basic)):
        return None  # math-verify kept the text: it compares strings
    if isinstance(gold, Relational) and isinstance(pred, Relational):
        return polynomial_equal(gold, pred)
    return interval_equal(gold, pred)

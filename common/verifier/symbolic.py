"""The symbolic tier, run only in the verifier's worker processes (pool.py), because sympy can run long on
legal input: math-verify's LaTeX parser (ANTLR -> sympy objects), exact rational numbers, and math-verify's
comparison.

Safety: only math-verify's LatexExtractionConfig is used, whose parser builds sympy objects from an ANTLR
parse tree, never ExprExtractionConfig, which runs sympy `parse_expr` (it evaluates Python). math-verify's
own signal-based timeouts are off (they fail off the main thread): the pool kills a worker instead.
"""
from __future__ import annotations

from contextlib import contextmanager

from common.verifier.equivalence import is_prose, normalize
from common.verifier.status import describe


class _SLLSyntaxError(Exception):
    """Stage one of two-stage parsing met a syntax error: parse again with full LL prediction."""


# Exceptions raised by our own code inside latex2sympy's parser (the hook below). math-verify's parse
# catches everything its parser raises and reports no parse, which would turn a bug of ours into a
# parse_error; _parse re-raises what is recorded here instead, so that the pool grades it `error`.
_hook_errors: list[Exception] = []


@contextmanager
def _ours():
    try:
        yield
    except Exception as error:
        _hook_errors.append(error)
        raise


def _bail(*_args) -> None:
    raise _SLLSyntaxError


def _predict_sll(parser) -> None:
    """SLL prediction; a syntax error raises _SLLSyntaxError (the lexer keeps latex2sympy's own listener)."""
    from antlr4.atn.PredictionMode import PredictionMode
    from antlr4.error.ErrorListener import ErrorListener

    bail = ErrorListener()
    bail.syntaxError = _bail
    parser._interp.predictionMode = PredictionMode.SLL
    parser.removeErrorListeners()
    parser.addErrorListener(bail)


def use_two_stage_parsing() -> None:
    """Make latex2sympy's ANTLR parser predict in SLL mode first and reparse in LL mode only on a syntax error:
    3-5x less parsing time, the same sympy objects (ANTLR documents that SLL gives LL's tree or a syntax
    error; a test checks it). Without the wrapped methods parsing stays plain LL (docs/verifier.md, "Hooks").
    """
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    if getattr(_Latex2Sympy, "two_stage", False) or not all(
            hasattr(_Latex2Sympy, name) for name in ("create_parser", "parse")):
        return
    create_parser, parse = _Latex2Sympy.create_parser, _Latex2Sympy.parse

    def create_sll_parser(self, latex_str):
        parser = create_parser(self, latex_str)  # latex2sympy's: what it raises is a parse failure
        if self.__dict__.get("sll", False):
            with _ours():
                _predict_sll(parser)
        return parser

    def parse_two_stage(self, latex_str):
        self.sll = True  # parse() recurses on sub-formulas; each call starts in SLL
        try:
            return parse(self, latex_str)
        except _SLLSyntaxError:
            self.sll = False
            return parse(self, latex_str)

    _Latex2Sympy.create_parser, _Latex2Sympy.parse = create_sll_parser, parse_two_stage
    _Latex2Sympy.parse_ll, _Latex2Sympy.two_stage = parse, True  # parse_ll: for the tests


def _parse(latex: str) -> list:
    # Imported here: the calling process (fast path) never pays for sympy / ANTLR.
    from math_verify import LatexExtractionConfig, parse

    use_two_stage_parsing()
    _hook_errors.clear()
    parsed = parse(latex, extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if _hook_errors:  # a bug of ours inside the parser, which math-verify caught: not a parse failure
        error = _hook_errors[0]
        _hook_errors.clear()
        raise error
    return parsed


def parse_answer(answer: str) -> list:
    """sympy objects (plus math-verify's string fallback) for one answer; [] when nothing parses.

    A bare answer is parsed as one LaTeX formula. An answer that is prose or holds its own boxes
    or `$...$` goes to math-verify's extraction, which finds the final formula in it.
    """
    if not is_prose(answer):
        return _parse(f"${normalize(answer)}$")
    return _parse(answer)


def _exact_numbers(gold: list, pred: list) -> bool | None:
    """Exact comparison when both sides are rational numbers (math-verify rounds: 1/2^99 == 1/2^98)."""
    import sympy

    def rational(items):
        first = items[0] if items else None
        if isinstance(first, sympy.Basic) and not isinstance(first, sympy.Float) and first.is_number:
            value = first.doit()
            if value.is_Rational:
                return value
        return None

    g, p = rational(gold), rational(pred)
    if g is None or p is None:
        return None
    return bool(g == p)


def symbolic_equal(pred: str, gold: str, golds: dict[str, list] | None = None) -> tuple[bool, str]:
    """(equal, status) for what the calling process left undecided; status is ok or parse_error (math-verify
    returns no parse for a side). Run it in a killable worker; an exception out of here is a bug of ours.

    `golds` caches parsed golds by their text (a gold is graded once per sampled response).
    """
    from math_verify import verify

    if golds is None:
        gold_parsed = parse_answer(gold)
    elif (gold_parsed := golds.get(gold)) is None:
        gold_parsed = golds[gold] = parse_answer(gold)
    pred_parsed = parse_answer(pred)
    if not pred_parsed or not gold_parsed:
        return False, "parse_error"
    decided = _exact_numbers(gold_parsed, pred_parsed)
    if decided is None:
        decided = verify(gold_parsed, pred_parsed, timeout_seconds=None, strict=True)
    return bool(decided), "ok"


# Answer shapes common in math data (written for this purpose, not taken from any test set), graded
# before any worker takes a timed job (in the forkserver, whose forks inherit the warm state, else in
# the worker's initializer): the imports sympy defers (simplify, solve, sets) and the parser's
# prediction DFA for these shapes then cost nothing inside the time bound.
WARM_UP_PAIRS = [
    ("\\frac{3}{7}", "\\dfrac{6}{14}"), ("2\\sqrt{5}", "\\sqrt{20}"), ("\\frac{\\pi}{3}", "60^\\circ"),
    ("x^2 + 2x + 1", "(x+1)^2"), ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}"), ("3 + 4i", "4i + 3"),
    ("(2, -1)", "(2,-1)"), ("[0, 3)", "[0,3)"), ("(-\\infty, 1] \\cup [4, \\infty)", "(-\\infty,1]\\cup[4,\\infty)"),
    ("\\{1, 2, 5\\}", "\\{5, 2, 1\\}"), ("x = 3, y = -2", "y=-2, x=3"), ("y = 2x - 5", "2x - y - 5 = 0"),
    ("x \\geq 2", "x \\ge 2"), ("1 < x < 4", "(1, 4)"), ("a_n = 2^{n} - 1", "a_n=2^n-1"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}"),
    ("\\sin^2 x", "1 - \\cos^2 x"), ("\\log_2 8", "3"), ("e^{2}", "\\exp(2)"), ("\\text{(C)}", "C"),
    ("\\frac{a+b}{2}", "\\frac{b+a}{2}"), ("The answer is $\\frac{5}{2}$.", "\\frac52"), ("10^{-3}", "0.001"),
]
_warm = False


def warm_up() -> None:
    """Grade WARM_UP_PAIRS once in this process (idempotent; a fork inherits the warm state).

    Never raises: the forkserver runs it on import, where an exception would take the server down. An
    exception is logged, one line per pair, and warm-up goes on; the same bug then grades as `error`.
    """
    global _warm
    if _warm:
        return
    _warm = True
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    for pred, gold in WARM_UP_PAIRS:
        try:
            symbolic_equal(pred, gold)
        except Exception as error:
            logging.getLogger(__name__).warning("verifier warm-up: %s on %r against %r", describe(error), pred, gold)

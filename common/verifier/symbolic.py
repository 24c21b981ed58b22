"""The symbolic tier, run only in the verifier's worker processes (pool.py), because sympy can still run
long on legal input: relations.py first, then math-verify's LaTeX parser (ANTLR -> sympy objects) and
its comparison, with exact comparison of rational numbers first.

Safety: math-verify's ExprExtractionConfig runs sympy `parse_expr` (which evaluates Python) on the
text, so it is never used; only LatexExtractionConfig is, whose parser builds sympy objects from an
ANTLR parse tree. math-verify's own signal-based timeouts are switched off (they fail off the main
thread); the pool kills a worker that runs past the time bound instead.
"""
from __future__ import annotations

from contextlib import contextmanager

from common.verifier.equivalence import decide, is_prose, normalize
from common.verifier.relations import relational_equal


class _SLLSyntaxError(Exception):
    """Stage one of two-stage parsing met a syntax error: parse again with full LL prediction."""


# Exceptions raised by our own code inside latex2sympy's parser (the hooks below). math-verify's parse
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


def use_two_stage_parsing() -> None:
    """Make latex2sympy's ANTLR parser predict in SLL mode first and fall back to LL on a syntax error
    (and build integer tokens without sympify, `_integer_number`).

    The generated LaTeX grammar is ambiguous enough that ANTLR's default LL prediction keeps
    falling back to full-context prediction, which its DFA cache does not remember, so every
    answer pays for it again (about half of all symbolic time on the public cases, by cProfile). ANTLR documents
    that SLL prediction returns either the same parse tree as LL or a syntax error, so
    "SLL, then LL on a syntax error" (the two-stage strategy of the ANTLR book) gives the same
    sympy objects with 3-5x less parsing time; tests check it against plain LL. The hook wraps two methods of
    latex2sympy2_extended==1.11.0 (pinned); without them parsing stays plain LL.
    """
    from antlr4.atn.PredictionMode import PredictionMode
    from antlr4.error.ErrorListener import ErrorListener
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    if getattr(_Latex2Sympy, "two_stage", False) or not all(
            hasattr(_Latex2Sympy, name) for name in ("create_parser", "parse")):
        return
    create_parser, parse = _Latex2Sympy.create_parser, _Latex2Sympy.parse
    bail = ErrorListener()
    bail.syntaxError = _bail  # the lexer keeps latex2sympy's own listener: SLL does not change lexing

    def create_sll_parser(self, latex_str):
        parser = create_parser(self, latex_str)  # latex2sympy's: what it raises is a parse failure
        if self.__dict__.get("sll", False):
            with _ours():
                parser._interp.predictionMode = PredictionMode.SLL
                parser.removeErrorListeners()
                parser.addErrorListener(bail)
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
    if hasattr(_Latex2Sympy, "parse_number"):
        _Latex2Sympy.parse_number = _integer_number(_Latex2Sympy.parse_number)


def _integer_number(parse_number):
    """latex2sympy builds every number with sympy.Number(text), which goes through sympify and
    parse_expr (~10% of all symbolic time on the public cases). For a token of digits only,
    sympy.Integer(int(text)) is the same object without either; anything else keeps the original."""

    def parse_integer(self, text):
        if not (text.isascii() and text.isdigit()):
            return parse_number(self, text)
        with _ours():
            return _integer(text)

    parse_integer.original = parse_number
    return parse_integer


def _integer(digits: str):
    import sympy

    return sympy.Integer(int(digits))


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
    """(equal, status) via math-verify; status is ok or parse_error. Run it in a killable worker.

    parse_error when math-verify returns no parse for either side (it catches what its parser raises on
    odd LaTeX). Any exception that gets out of here is a bug of ours, which the pool grades `error`.

    `golds` caches parsed golds by their text (the same gold is graded once per sampled response);
    the parse of a gold depends on nothing but its text, so a cached parse is the same parse.
    """
    from math_verify import verify

    pred, decided = decide(pred, gold)
    if decided is not None:
        return decided
    relational = relational_equal(pred, gold)
    if relational is not None:
        return relational, "ok"
    if golds is None:
        gold_parsed = parse_answer(gold)
    elif (gold_parsed := golds.get(gold)) is None:
        gold_parsed = golds[gold] = parse_answer(gold)
    pred_parsed = parse_answer(pred)
    if not pred_parsed or not gold_parsed:
        return False, "parse_error"
    exact = _exact_numbers(gold_parsed, pred_parsed)
    if exact is not None:
        return exact, "ok"
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, strict=True)), "ok"


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

    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: the pool is the timeout
    for pred, gold in WARM_UP_PAIRS:  # straight to the parser and math-verify: the cheap tiers would decide most
        try:
            gold_parsed, pred_parsed = parse_answer(gold), parse_answer(pred)
            if gold_parsed and pred_parsed:
                verify(gold_parsed, pred_parsed, timeout_seconds=None, strict=True)
        except Exception as error:
            logging.getLogger(__name__).warning("verifier warm-up: %s: %s on %r against %r", type(error).__name__,
                                                error, pred, gold)

"""The math verifier: extraction, equivalence, safety, time bounds, threads, the CLI and accuracy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from pipeline_helpers import ROOT, SHARED_DATA, needs_shared
from verifier_processes import worker_pids

import common.verifier as verifier
from common.config import config_from_dict
from common.errors import ConfigError
from common.verifier import STATUSES, grade, grade_batch, shutdown, start
from common.verifier.equivalence import guard
from common.verifier.extract import extract_answer
from common.verifier.symbolic import _exact_numbers, parse_answer, use_two_stage_parsing

DATA = SHARED_DATA
PUBLIC_CASES = DATA / "verifier-cases-public.jsonl"
DISAGREEMENTS = ROOT / "tests" / "data" / "verifier_disagreements.jsonl"


def boxed(answer: str) -> str:
    return f"Let me think step by step. The final answer is \\boxed{{{answer}}}."


# --- extraction ---------------------------------------------------------------------------------

@pytest.mark.parametrize("response, expected", [
    ("first \\boxed{3}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("so it is \\boxed 5.", "5"),
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{\\boxed{1}, \\boxed{2}}", "\\boxed{1}, \\boxed{2}"),
    ("work...\nAnswer: 42", "42"),
    ("\\boxed{7} was wrong.\nAnswer: $12$", "$12$"),
    ("Answer: 3, so the final answer is \\boxed{4}", "4"),
])
def test_extraction_takes_the_last_answer(response, expected):
    answer, status, _ = extract_answer(response)
    assert (answer, status) == (expected, "ok")


@pytest.mark.parametrize("response", [
    "The answer is 42",                        # no box: the whole text is never graded
    "first \\boxed{42} then \\boxed{4",        # the final box is cut off: not an older box
    "\\boxed{" + "{" * 50_000,                 # a truncated megabyte-ish box
])
def test_no_box_or_a_truncated_box_is_no_answer(response):
    g = grade(response, "42")
    assert (g.status, g.correct, g.reward) == ("no_answer", False, 0.0)


def test_a_megabyte_of_nested_braces_is_graded_in_process_and_completely():
    """Extraction alone decides them (its cost is `make bench-verifier`'s slowest adversarial response):
    no worker is started for any of them."""
    adversarial = ["\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
                   "{" * 1_000_000 + " so \\boxed{12}",
                   "\\boxed{" * 200_000]
    shutdown()
    grades = grade_batch([(text, "12") for text in adversarial], timeout_s=5)
    assert [g.status for g in grades] == ["no_answer", "ok", "no_answer"]  # the tail of the first is all "}"
    assert grades[1].correct
    assert worker_pids() == []


# --- equivalence --------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gold, equal", [
    ("50", "0.5", False), ("0.5", "50", False), ("1000.0", "1000", True), ("142", "142.0", True),
    ("7,425,000", "7425000", True), ("32, 349", "32349", False), ("\\text{5}", "5", True),
    ("\\mathbf{12}", "12", True), ("\\dfrac{1}{2}", "\\frac12", True), ("90^\\circ", "90", True),
    ("28\\%", "28", True), ("x = 4", "4", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("[0,1)", "[0,1]", False), ("(0,1)", "[0,1)", False), ("(1,2)", "(2,1)", False),
    ("\\{1,2\\}", "\\{2,1\\}", True), ("10, 4, -2", "4, 10, -2", False), ("12345", "12346", False),
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("1 + \\frac{1}{e}", "1 - \\frac{1}{e}", False),
])
def test_equivalence(pred, gold, equal):
    assert grade(boxed(pred), gold).correct is equal


EXACT_FORMS = [  # (pred, gold, equal / None = as math-verify reads it: its rounding, its bracket readings)
    ("\\frac{1}{2}", "0.5", True), ("0.5", "\\dfrac12", True), ("50", "0.5", False), ("-\\frac{10}{9}", "-10/9", True),
    ("\\frac3{3}", "1", True), ("\\frac{2}{4}", "\\frac{1}{2}", False), ("\\frac{2}{4}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt3", "\\sqrt{3}", True),
    ("\\sqrt{4}", "2", True), ("4\\sqrt{2}", "4", False), ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True), ("\\frac94\\pi", "\\frac{9}{4}\\pi", True),
    ("\\frac{3\\pi}{4}", "\\frac{3}{4}\\pi", True), ("3\\pi", "3", False), ("0\\pi", "0", True),
    ("[0,1)", "[0,1]", False), ("(1,2)", "[1,2]", False), ("(3, \\frac{\\pi}{2})", "( 3, \\frac{\\pi}{2} )", True), ("(1, \\frac{1}{2})", "(1, 0.5)", True),
    ("(0, 1)", "(0, 1.5)", False), ("\\{1,2\\}", "\\{2,1,1\\}", True), ("(1,2,3)", "(1,2)", False),
    ("\\frac{1}{3}", "0.333333", None), ("\\sqrt{2}", "1.414214", None), ("(1,2,3)", "[1,2,3]", None),
    ("(1,2)", "\\{1,2\\}", None), ("2\\frac{1}{2}", "\\frac{5}{2}", None), ("(2,1)", "(1,2)", None),
    ("\\frac{5}{0}", "\\frac{6}{0}", None), ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False), ("\\frac34i", "\\frac{3}{4}i", None),
]


def test_exact_forms_grade_as_mathematics_and_as_math_verify():
    """Fractions, surds, multiples of pi and bracketed lists: graded as written above, and as math-verify on
    our parses grades them (but for the \\frac{2}{4} rule, which is ours), so our tiers change no verdict."""
    grades = grade_batch([(boxed(pred), gold) for pred, gold, _ in EXACT_FORMS])
    for (pred, gold, expected), g in zip(EXACT_FORMS, grades):
        assert g.status == "ok", (pred, gold, g)
        assert expected is None or g.correct is expected, (pred, gold)
        if "\\frac{2}{4}" not in pred:
            assert g.correct is math_verify_equal(pred, gold), (pred, gold)


def math_verify_equal(pred: str, gold: str) -> bool:
    """What the workers answer: math-verify on parse_answer's parses, rational numbers compared exactly."""
    from math_verify import verify

    gold_parsed, pred_parsed = parse_answer(gold), parse_answer(pred)
    if not gold_parsed or not pred_parsed:
        return False
    exact = _exact_numbers(gold_parsed, pred_parsed)
    return exact if exact is not None else bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, strict=True))


RELATIONS = [  # (pred, gold, equal): equations, inequalities and intervals, graded by math-verify in the workers
    ("$y = -\\frac{1}{2}x + \\frac{3}{4}$", "$2x+4y-3=0$", True), ("$x^2/16 + y^2/12 = 1/4$", "$x^2/4 + y^2/3 = 1$", True),
    ("$-34x-45y+20z-100=0$", "$34x+45y-20z+100=0$", True), ("x + y - z + 2 = 0", "5x - 7y + 11z + 4 = 0", False),
    ("3x + 4y + 14=0", "3*x-1*y+13=0", False), ("$y=x$", "$x=y$", True), ("x - 2 = 0", "2 - x = 0", True),
    ("(x+1)^2 = 0", "x^2+2x+1=0", True), ("\\frac{x}{3} + \\frac{y}{4} = 1", "4x + 3y = 12", True),
    ("$x > -1$", "$x < 1$", False), ("x < 5", "5 > x", True), ("x \\le 5", "x < 5", False), ("x + y > 1", "x + y < 1", False),
    ("[-2,7]", "-2 \\le x \\le 7", True), ("$x \\in [-2,7]$", "$-2 \\\\le x \\\\le 7$", True), ("(-2,7]", "-2 \\le x \\le 7", False),
    ("x \\in (0, 1)", "0 < x < 1", True), ("$$(-793, 10)$$", "$$-793 < a < 10$$", True), ("(-\\infty, 3]", "x<3", False),
    ("[\\sqrt{2}, +\\infty)", "x \\ge \\sqrt{2}", True), ("(\\sqrt{2}, \\infty)", "x \\ge \\sqrt{2}", False),
]


def test_relations_are_graded_as_mathematics_says():
    grades = grade_batch([(boxed(pred), gold) for pred, gold, _ in RELATIONS])
    assert [(g.status, g.correct) for g in grades] == [("ok", expected) for _, _, expected in RELATIONS]


def test_two_stage_parsing_gives_the_same_sympy_objects_as_ll():
    import sympy
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    use_two_stage_parsing()
    formulas = ["\\frac{1}{2} + \\sqrt{3}", "(0, 1] \\cup [2, \\infty)", "\\{1, 2, 3\\}", "x^2 + y^2 = 1",
                "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", "\\sum_{k=0}^{n-1} F_k F_{n-k-1}", "1 \\leq |z| \\leq 2",
                "(3, \\frac{\\pi}{2})", "f(x) = \\sin^2 x", "a_3 = 2, a_{37} = 19", "11:21", "10^{\\frac{\\sqrt{13}-5}{6}}"]
    for formula in formulas:
        assert sympy.srepr(_Latex2Sympy(is_real=True).parse(formula)) == \
            sympy.srepr(_Latex2Sympy(is_real=True).parse_ll(formula)), formula


def test_power_towers_and_huge_exponents_are_rejected_before_symbolic_work():
    for answer in ["2^{2^{2^{2^{2}}}}", "10^{10^{10}}", "2^2^2^2", "9^{99999999}", "100000!"]:
        assert guard(answer), answer
    shutdown()
    grades = grade_batch([(boxed("10^{10^{10^{10}}}"), "1"), (boxed("2^{2^{2^{2^{2^{2}}}}}"), "2")], timeout_s=5)
    assert all(not g.correct for g in grades) and {g.status for g in grades} == {"parse_error"}
    assert worker_pids() == []  # rejected in the calling process: no worker (and no sympy) saw them


def test_identical_power_tower_strings_are_still_equal():
    tower = "\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}"
    assert grade(boxed(tower), tower).correct


# --- reward modes -------------------------------------------------------------------------------

def test_deepscaler_reward():
    formatted = "<think>2 + 2 is 4</think> So <answer>The answer is \\boxed{4}</answer>"
    cases = [(formatted, "4", 1.0), (formatted, "5", 0.33), ("plain \\boxed{4}", "4", 0.67), ("plain 4", "4", 0.0),
             ("<think>x</think><answer>4</answer>", "4", 0.0)]
    grades = grade_batch([(r, g) for r, g, _ in cases], mode="deepscaler")
    assert [g.reward for g in grades] == [expected for _, _, expected in cases]
    assert grade(formatted, "4", mode="correct").reward == 1.0
    with pytest.raises(ValueError):
        grade(formatted, "4", mode="lenient")


def test_config_validates_reward_mode_and_verifier_settings():
    assert config_from_dict({"score": {"reward_mode": "deepscaler"}}).score.reward_mode == "deepscaler"
    for key, value in [("reward_mode", "lenient"), ("verifier_workers", 0), ("verifier_timeout_s", 0)]:
        with pytest.raises(ConfigError, match=f"score.{key}"):
            config_from_dict({"score": {key: value}})


# --- safety -------------------------------------------------------------------------------------

def test_responses_that_try_to_execute_code_do_not_run(tmp_path):
    marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"(lambda: __import__('os').system('touch {marker}'))()",
        f"eval(\"__import__('os').system('touch {marker}')\")",
        f"Symbol('x').__class__.__mro__[-1].__subclasses__() or __import__('os').system('touch {marker}')",
        f"x**2 + exec(\"import os; os.system('touch {marker}')\")",
    ]
    responses = [boxed(p) for p in payloads] + [f"Answer: {p}" for p in payloads] + [f"$${p}$$ \\boxed{{{p}}}" for p in payloads]
    grades = grade_batch([(r, "0") for r in responses], timeout_s=5)
    assert not marker.exists()
    assert not any(g.correct for g in grades)


# 0.5-1.6 s of parsing and sympy here (full-LL parsing of the subscripts, simplify of two sums): a
# bound of 0.1 s always cuts it off, on any machine. Bare, so `F_n =` is dropped and both sums are parsed.
SLOW = "F_n = \\sum_{k=0}^{n-2} F_k F_{n-k-2} + \\sum_{j=1}^{n} G_j G_{n-j}"
SLOW_GOLD = "F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1} + \\sum_{j=0}^{n} G_j G_{n-j}"
# Pairs that only math-verify decides (so they reach the workers), each equal.
SYMBOLIC = [(boxed("\\frac{2}{3} + x"), "x + \\dfrac{2}{3}"), (boxed("\\sin^2 x + \\cos^2 x"), "1"),
            (boxed("(x+1)^2"), "x^2+2x+1"), (boxed("\\sqrt{2}\\cdot\\sqrt{3}"), "\\sqrt{6}")]


def test_a_slow_response_times_out_its_worker_is_replaced_and_the_batch_completes():
    after = [(boxed("\\frac{1}{2}"), "0.5"), (boxed("\\sqrt{4}"), "2"), (boxed("7"), "7")]
    shutdown()  # one slot only: slots another test started would stay up beside it
    assert all(g.correct for g in grade_batch(SYMBOLIC[:1], workers=1))
    before = worker_pids()
    grades = grade_batch([(boxed(SLOW), SLOW_GOLD), (boxed(SLOW + " "), SLOW_GOLD)] + after, workers=1, timeout_s=0.1)
    assert [g.status for g in grades[:2]] == ["timeout", "timeout"]
    assert all(g.status == "ok" and g.correct for g in grades[2:])
    assert len(before) == 1 and _eventually(lambda: len(worker_pids()) == 1 and worker_pids() != before)


def test_grading_from_a_non_main_thread():
    shutdown()  # so that the pool is started from the thread
    results = {}

    def work():
        results["grades"] = grade_batch([(boxed("\\frac{2}{3}"), "\\dfrac{2}{3}"), (boxed("\\sqrt{2}"), "1.5")] + SYMBOLIC)
        results["pids"] = worker_pids()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert [g.correct for g in results["grades"]] == [True, False] + [True] * len(SYMBOLIC)
    assert {g.status for g in results["grades"]} == {"ok"}
    assert len(results["pids"]) == 2
    # The pool a thread started serves the main thread too, and another thread after it.
    assert all(g.correct for g in grade_batch(SYMBOLIC)) and worker_pids() == results["pids"]
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert results["pids"] == worker_pids()


# --- errors of our own code -------------------------------------------------------------------

def test_a_bug_in_an_in_process_tier_grades_error_with_its_message_and_logs_one_line(monkeypatch, caplog):
    def broken(pred, gold):
        raise TypeError("injected bug")

    monkeypatch.setattr(verifier, "decide", broken)  # what grade_batch calls first on every extracted answer
    with caplog.at_level("WARNING", logger="common.verifier"):
        grades = grade_batch([(boxed("4"), "4"), (boxed("5"), "4"), ("no box", "4")])
    assert [g.status for g in grades] == ["error", "error", "no_answer"]  # never parse_error, never a crashed batch
    assert [g.error for g in grades] == ["TypeError: injected bug"] * 2 + [None]
    assert [g.extracted_answer for g in grades] == ["4", "5", None] and not any(g.correct for g in grades)
    lines = [r.getMessage() for r in caplog.records if "verifier bug" in r.getMessage()]
    assert len(lines) == 1 and "2 of 3 answers" in lines[0] and "TypeError: injected bug" in lines[0]


def run_with_worker_code(tmp_path: Path, injected: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where every process, the pool's workers included, first runs
    `injected` (a sitecustomize module): the only way to change code inside workers that start from a
    fresh interpreter (the forkserver) rather than from the test process."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(injected))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=180)


INJECTED_BUG = """
    import common.verifier.symbolic as symbolic

    def _exact_numbers(gold, pred):  # one of our tiers, which only the workers run
        raise TypeError("injected bug")

    symbolic._exact_numbers = _exact_numbers
"""
GRADE_SYMBOLIC = f"""
    import json
    from common.verifier import grade_batch
    if __name__ == "__main__":
        print(json.dumps([(g.status, g.correct, g.error) for g in grade_batch({SYMBOLIC!r})]))
"""


def test_a_bug_in_our_code_inside_a_worker_grades_error_not_parse_error(tmp_path):
    done = run_with_worker_code(tmp_path, INJECTED_BUG, GRADE_SYMBOLIC)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["error", False, "TypeError: injected bug"]] * len(SYMBOLIC)
    warnings = [line for line in done.stderr.splitlines() if "verifier bug" in line]
    assert len(warnings) == 1 and f"on {len(SYMBOLIC)} of {len(SYMBOLIC)} answers" in warnings[0], done.stderr
    # The control: the same run without the injected bug grades every pair ok and correct.
    done = run_with_worker_code(tmp_path, "", GRADE_SYMBOLIC)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["ok", True, None]] * len(SYMBOLIC)
    assert "verifier bug" not in done.stderr


# math-verify returns no parse for these (parse_error), and keeps the text of these, which it then compares as
# strings (ok, not equal): neither is an exception of ours.
def test_a_worker_that_dies_while_grading_grades_that_answer_error_and_the_rest_ok(tmp_path):
    injected = """
        import os
        import common.verifier.symbolic as symbolic

        real = symbolic._exact_numbers

        def _exact_numbers(gold, pred):
            if "dies" in str(gold):
                os.kill(os.getpid(), 9)  # as the kernel's out-of-memory killer would
            return real(gold, pred)

        symbolic._exact_numbers = _exact_numbers
    """
    script = f"""
        import json
        from common.verifier import grade_batch
        if __name__ == "__main__":
            grades = grade_batch([({boxed("x")!r}, "x_{{dies}}")] + {SYMBOLIC!r})
            print(json.dumps([(g.status, g.error) for g in grades]))
    """
    done = run_with_worker_code(tmp_path, injected, script)
    assert done.returncode == 0, done.stderr
    (status, error), *rest = json.loads(done.stdout)
    assert status == "error" and "the worker died while grading" in error and "exit code -9" in error, error
    assert rest == [["ok", None]] * len(SYMBOLIC)


def test_a_bug_in_our_parser_hook_grades_error_although_math_verify_catches_it(tmp_path):
    """Our SLL hook runs inside latex2sympy's parser, whose exceptions math-verify turns into "no parse"."""
    injected = """
        import common.verifier.symbolic as symbolic

        def _predict_sll(parser):
            raise TypeError("injected bug in a parser hook")

        symbolic._predict_sll = _predict_sll
    """
    pairs = [(boxed("x^2 + 2x + 1"), "(x+1)^2"), (boxed("\\sin x"), "\\cos x")]
    script = f"""
        import json
        from common.verifier import grade_batch
        if __name__ == "__main__":
            print(json.dumps([(g.status, g.error) for g in grade_batch({pairs!r})]))
    """
    done = run_with_worker_code(tmp_path, injected, script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["error", "TypeError: injected bug in a parser hook"]] * 2
    done = run_with_worker_code(tmp_path, "", script)  # the control: without the bug both grade ok
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["ok", None]] * 2


@pytest.mark.parametrize("pred, status", [("\\text{}", "parse_error"), ("\\quad", "parse_error"),
                                          ("The answer is nothing", "parse_error"), ("\\frac{1}{}", "ok"), ("=)(", "ok")])
def test_latex_the_parser_cannot_read_is_a_parse_error_or_unequal_never_an_error(pred, status):
    g = grade(boxed(pred), "x + \\frac{2}{3}")
    assert (g.status, g.correct, g.error) == (status, False, None)


# --- the persistent pool ------------------------------------------------------------------------

def _gone(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):  # dead, and its parent (the forkserver) is about to reap it
            return True
        time.sleep(0.05)
    return False


def test_the_pool_is_reused_across_batches():
    first = grade_batch(SYMBOLIC, workers=2)
    pids = worker_pids()
    second = grade_batch(list(reversed(SYMBOLIC)), workers=2)
    assert len(pids) == 2 and worker_pids() == pids
    assert all(g.correct for g in first + second)
    assert grade(boxed("x^{2}+2x+1"), "(x+1)^2").correct and worker_pids() == pids  # one worker of the same pool


def test_started_workers_are_the_ones_that_grade():
    """`start` brings the workers up before any answer needs one (a resident score worker calls it at
    open): no job has run, and the first symbolic batch is graded by exactly those processes."""
    shutdown()
    assert worker_pids() == []
    start(2)
    started = worker_pids()
    assert len(started) == 2
    assert all(g.correct for g in grade_batch(SYMBOLIC, workers=2)) and worker_pids() == started


def _eventually(condition, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_timed_out_worker_is_replaced_and_its_replacement_kept():
    grade_batch(SYMBOLIC, workers=2)
    before = worker_pids()
    grades = grade_batch([(boxed(SLOW), SLOW_GOLD)], workers=1, timeout_s=0.1)
    assert grades[0].status == "timeout"
    # pebble starts the replacement on its own thread, just after it has stopped the worker that ran over.
    assert _eventually(lambda: len(worker_pids()) == 2)
    replaced = worker_pids()
    assert len(before) == 2
    gone = set(before) - set(replaced)
    assert len(gone) == 1 and len(set(replaced) - set(before)) == 1  # only the worker that ran over
    assert _gone(gone.pop())
    assert all(g.correct for g in grade_batch(SYMBOLIC, workers=2))
    assert worker_pids() == replaced


def test_a_worker_killed_from_outside_while_idle_costs_no_grade():
    grade_batch(SYMBOLIC, workers=2)
    os.kill(worker_pids()[0], 9)
    assert all(g.status == "ok" and g.correct for g in grade_batch(SYMBOLIC, workers=2))
    time.sleep(0.3)  # pebble has seen the death by now: a pool it broke is replaced on the next call
    assert all(g.status == "ok" and g.correct for g in grade_batch(SYMBOLIC, workers=2))
    assert len(worker_pids()) == 2


def test_the_time_bound_holds_inside_c_code(tmp_path):
    """A job stuck in one long C call that never checks for signals (PBKDF2 with 10^9 rounds, minutes) is
    killed at the bound: the worker dies of SIGTERM at once, where a Python-level handler (pebble's own)
    would wait for the call to return, until pebble's SIGKILL 3 s later."""
    injected = """
        import hashlib
        import common.verifier.symbolic as symbolic

        def _exact_numbers(gold, pred):
            if "cbound" in str(gold):
                return hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10 ** 9) == b""
            return None

        symbolic._exact_numbers = _exact_numbers
    """
    script = f"""
        import json, multiprocessing.context
        from common.verifier import grade_batch

        started, start = [], multiprocessing.context.ForkServerProcess.start

        def recorded_start(process):  # every worker the pool starts, to read how the stopped one died
            started.append(process)
            start(process)

        multiprocessing.context.ForkServerProcess.start = recorded_start
        if __name__ == "__main__":
            assert all(g.correct for g in grade_batch({SYMBOLIC!r}))  # the pool is up and warm
            grades = grade_batch([({boxed("x")!r}, "x_{{cbound}}")] + {SYMBOLIC!r}, timeout_s=0.5)
            codes = [p.exitcode for p in started if p.exitcode is not None]
            print(json.dumps([codes] + [g.status for g in grades]))
    """
    done = run_with_worker_code(tmp_path, injected, script)
    assert done.returncode == 0, done.stderr
    codes, *statuses = json.loads(done.stdout)
    assert statuses == ["timeout"] + ["ok"] * len(SYMBOLIC)
    # Killed by the SIGTERM itself, at the bound: pebble's SIGKILL, due 3 s later, would read -9.
    assert codes == [-signal.SIGTERM], codes


def test_no_worker_outlives_shutdown_or_the_interpreter():
    grade_batch(SYMBOLIC, workers=2)
    pids = worker_pids()
    shutdown()
    assert worker_pids() == [] and len(pids) == 2
    assert all(_gone(pid) for pid in pids)
    assert all(g.correct for g in grade_batch(SYMBOLIC, workers=2))  # and the next call starts it again
    assert set(worker_pids()).isdisjoint(pids)
    # A process that exits without calling shutdown(): its workers go with it (atexit).
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, "tests")
        from common.verifier import grade_batch
        from verifier_processes import worker_pids
        grade_batch({SYMBOLIC!r}, workers=2)
        print(*worker_pids())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    child_pids = [int(pid) for pid in done.stdout.split()]
    assert len(child_pids) == 2 and all(_gone(pid) for pid in child_pids)


def test_a_forked_process_starts_its_own_pool_and_leaves_the_parents_alone():
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, "tests")
        from common.verifier import grade_batch
        from verifier_processes import worker_pids
        pairs = {SYMBOLIC!r}
        assert all(g.correct for g in grade_batch(pairs))
        parent = worker_pids()
        child = os.fork()
        if child == 0:
            ok = all(g.correct for g in grade_batch(pairs))
            print("child", ok, *worker_pids(), flush=True)
            os._exit(0 if ok and set(worker_pids()).isdisjoint(parent) else 1)
        _, status = os.waitpid(child, 0)
        ok = all(g.correct for g in grade_batch(pairs))
        print("parent", ok, *parent, "|", *worker_pids(), flush=True)
        sys.exit(0 if status == 0 and ok and worker_pids() == parent else 1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_forked_child_that_exits_normally_costs_the_parent_no_grade():
    """A child of a bare os.fork() that exits through the interpreter runs multiprocessing's and pebble's
    exit handlers, which stop the workers they inherited records of: the parent's. The parent grades on."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from common.verifier import grade_batch
        pairs = {SYMBOLIC!r}
        assert all(g.correct for g in grade_batch(pairs))
        child = os.fork()
        if child == 0:
            sys.exit(0)
        os.waitpid(child, 0)
        for wait in (0.0, 0.5):  # at once, and after pebble has seen any death
            time.sleep(wait)
            grades = grade_batch(pairs)
            assert [(g.status, g.correct) for g in grades] == [("ok", True)] * len(pairs), grades
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_round_trip_through_a_subprocess():
    rows = [{"gold": "4", "response": boxed("4")}, {"gold": "1/2", "response": boxed("\\frac{1}{2}")},
            {"gold": "3", "response": "no box"}, {"gold": "[0,1)", "response": boxed("[0,1]")}]
    stdin = "".join(json.dumps(r) + "\n" for r in rows)
    done = subprocess.run([sys.executable, "-m", "common.verifier", "--workers", "1", "--timeout", "5"],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(o["correct"], o["status"], o["extracted"]) for o in out] == [
        (True, "ok", "4"), (True, "ok", "\\frac{1}{2}"), (False, "no_answer", None), (False, "ok", "[0,1]")]
    assert all(set(o) == {"correct", "reward", "status", "extracted"} for o in out)
    help_text = subprocess.run([sys.executable, "-m", "common.verifier", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=60).stdout
    assert "--mode" in help_text and "--timeout" in help_text


# --- accuracy -----------------------------------------------------------------------------------

@needs_shared
def test_public_cases_accuracy_and_no_false_positives():
    cases = [json.loads(line) for line in PUBLIC_CASES.read_text().splitlines()]
    grades = grade_batch([(boxed(c["pred"]), c["gold"]) for c in cases])
    assert [(i, g.error) for i, g in enumerate(grades) if g.status == "error"] == []  # a bug of ours is never a grade
    assert {g.status for g in grades} <= set(STATUSES)
    disagreements = {i for i, (c, g) in enumerate(zip(cases, grades)) if g.correct != c["equal"]}
    false_positives = {i for i in disagreements if grades[i].correct}
    listed = [json.loads(line) for line in DISAGREEMENTS.read_text().splitlines()]
    assert false_positives == set()
    assert 1 - len(disagreements) / len(cases) >= 0.97
    assert disagreements == {d["index"] for d in listed}
    assert all(d["reason"] and cases[d["index"]]["gold"] == d["gold"] for d in listed)


def eval_golds() -> list[str]:
    golds = []
    for name in ["MATH-500", "AMC23", "AIME24", "AIME25"]:
        table = pl.read_parquet(DATA / f"eval-{name}.parquet")
        golds += [str(row["ground_truth"]) for row in table["reward_model"].to_list()]
    return golds


@needs_shared
def test_eval_golds_equal_themselves_and_not_other_golds():
    golds = eval_golds()
    others = [(g, golds[(i + 1) % len(golds)]) for i, g in enumerate(golds)]
    others = [(a, b) for a, b in others if a.strip() != b.strip()]
    grades = grade_batch([(boxed(g), g) for g in golds] + [(boxed(a), b) for a, b in others])
    assert [(i, g.error) for i, g in enumerate(grades) if g.status == "error"] == []
    self_rate = sum(g.correct for g in grades[: len(golds)]) / len(golds)
    other_rate = sum(not g.correct for g in grades[len(golds):]) / len(others)
    assert self_rate == 1.0
    assert other_rate >= 0.995

"""Find the final answer in a response: the last balanced \\boxed{...}, else the last `Answer:` line.

Everything here is linear in the response length and bounded: responses are cut to their tail
first, and brace matching only looks at a window around the last box, so a megabyte of nested
braces costs no more than a short response.
"""
from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 32_000  # answers sit at the end; longer responses are cut to this tail
MAX_ANSWER_CHARS = 2_000     # a box longer than this is not an answer a grader should parse

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)
_UNBRACED_BOX = re.compile(r"\s+([^\s$]+)")


def tail(response: str) -> str:
    return response[-MAX_RESPONSE_CHARS:] if len(response) > MAX_RESPONSE_CHARS else response


def _last_box_command(text: str, end: int) -> tuple[int, str]:
    return max((text.rfind(command, 0, end), command) for command in _BOX_COMMANDS)


def last_boxed(text: str) -> tuple[str | None, str, int]:
    """(content, status, end) of the last box: status is ok, no_answer (none, or cut off) or parse_error (too long).

    "Last" is the outermost box around the last box opener, so `\\boxed{\\boxed{1}, \\boxed{2}}`
    gives `\\boxed{1}, \\boxed{2}` and not `2`; a truncated final box is no_answer, never an older box.
    """
    start, command = _last_box_command(text, len(text))
    while start >= 0:
        after = start + len(command)
        rest = text[after : after + 8].lstrip()
        if rest.startswith("{"):
            break
        match = _UNBRACED_BOX.match(text, after)  # `\boxed 5`
        if match and not text[after:after + 1].isalpha():
            return match.group(1).rstrip(".,;"), "ok", match.end()
        start, command = _last_box_command(text, start)  # e.g. `\boxedsomething`: look further back
    if start < 0:
        return None, "no_answer", -1

    # Scan a bounded window with a stack of open braces; remember each completed box.
    window_start = max(0, start - MAX_ANSWER_CHARS)
    window_end = min(len(text), start + MAX_ANSWER_CHARS + 64)
    stack: list[tuple[bool, int]] = []  # (is_box, content_start)
    best: tuple[int, int] | None = None   # content span of the outermost completed box around `start`
    last_closed = False
    for token in _BOX_TOKENS.finditer(text, window_start, window_end):
        if token.group() != "}":
            stack.append((token.group() != "{", token.end()))
            continue
        if not stack:
            continue
        is_box, content_start = stack.pop()
        if not is_box or content_start <= start and token.start() < start:
            continue
        if content_start > start:  # the last opener itself
            last_closed = True
        if token.start() - content_start <= MAX_ANSWER_CHARS:
            best = (content_start, token.start())
    if not last_closed:
        # Not closed inside the window: either a truncated box or an over-long answer.
        opens = text.count("{", start) - text.count("\\{", start)
        closes = text.count("}", start) - text.count("\\}", start)
        return None, ("no_answer" if closes < opens else "parse_error"), start
    if best is None:
        return None, "parse_error", start
    return text[best[0] : best[1]].strip(), "ok", best[1]


def last_answer_line(text: str) -> tuple[int, str | None]:
    """(position, answer) of the DAPO template's last `Answer:` line; position -1 when there is none."""
    lowered = text.lower()
    cursor = len(lowered)
    while True:
        position = lowered.rfind("answer", 0, cursor)
        if position < 0:
            return -1, None
        match = _ANSWER_LINE.match(lowered, position)
        if match:
            break
        cursor = position
    line_end = text.find("\n", match.end())
    line = text[match.end() : line_end if line_end >= 0 else len(text)].strip().strip("*").strip()
    if not line and line_end >= 0:  # "Answer:\n42": the answer is on the next line
        next_end = text.find("\n", line_end + 1)
        line = text[line_end + 1 : next_end if next_end >= 0 else len(text)].strip().strip("*").strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    if not line or len(line) > MAX_ANSWER_CHARS:
        return position, None
    return position, line


def extract_answer(response: str) -> tuple[str | None, str, bool]:
    """(answer, status, from_box) for a response; the whole text is never graded."""
    text = tail(response)
    box_at = max(text.rfind(command) for command in _BOX_COMMANDS)
    line_at, line = last_answer_line(text)
    boxed, status, box_end = last_boxed(text)
    if line_at > box_at and line_at > box_end:  # an `Answer:` line written after every box wins
        return line, ("ok" if line is not None else "no_answer"), False
    if status == "ok" and not boxed:
        return None, "parse_error", True
    return boxed, status, boxed is not None


def has_think_answer_format(response: str) -> bool:
    """<think>...</think> ... <answer> ... \\boxed{...} ... </answer>, the whole response (linear-time finds)."""
    text = response.strip()
    if not text.startswith("<think>"):
        return False
    think_end = text.find("</think>", len("<think>"))
    if think_end < 0:
        return False
    answer_start = text.find("<answer>", think_end)
    if answer_start < 0 or not text.endswith("</answer>"):
        return False
    inner = text[answer_start + len("<answer>") : len(text) - len("</answer>")]
    return "<answer>" not in inner and "</answer>" not in inner and last_boxed(inner)[1] == "ok"

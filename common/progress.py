"""Progress for people at a terminal, silence for CI: one bar helper and one summary line per stage.

A bar shows rows done, rows/s and the ETA (tqdm's own), plus tokens/s once tokens are reported. It
is drawn only when stderr is a terminal, so logs of CI and of `pytest` stay clean; `OPD_PROGRESS=0`
turns bars off at a terminal and `OPD_PROGRESS=1` forces them on (e.g. under `tee`).
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def progress_enabled() -> bool:
    setting = os.environ.get("OPD_PROGRESS", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


class Progress:
    """A tqdm bar over rows that also reports tokens/s. Use as a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "row"):
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), leave=False,
                        dynamic_ncols=True, file=sys.stderr)
        self.tokens = 0
        self.started = time.time()

    def update(self, rows: int, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.tokens:
            rate = self.tokens / max(time.time() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_summary(stage: str, iteration: int, rows: int, tokens: int, tokens_per_s: float, seconds: float,
                  details: str = "") -> str:
    """The one line a stage prints when it finishes: `score iter 3: 256 rows, 5,120 tokens, ...`."""
    line = (f"{stage} iter {iteration}: {rows:,} rows, {tokens:,} tokens, {tokens_per_s:,.0f} tok/s, "
            f"{seconds:.1f}s")
    line += f" | {details}" if details else ""
    print(line, flush=True)
    return line

"""`make inspect`: polars summaries of one iteration's shards, and one response token by token.

The token view puts the student's log-prob of each sampled token (lp, at sampling time) beside the
teacher's (lq). Per token, lp - lq is the reverse-KL estimate the loss pushes down: large and positive
where the student was sure of a token the teacher would not have written. In a terminal each token is
coloured by it (red: the teacher disagrees, blue: the teacher is surer than the student).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common import shards
from common.errors import UserError
from orchestrator.runs import require_iteration, require_run
from stages.score.mechanism import token_overlap


def summary(stage_path: Path) -> pl.DataFrame:
    frame = pl.scan_parquet(stage_path / "*.parquet")
    aggregates = [
        pl.len().alias("rows"),
        pl.col("response_ids").list.len().mean().alias("mean_len"),
        (pl.col("finish_reason") == "length").mean().alias("truncated"),
    ]
    names = frame.collect_schema().names()
    if "correct" in names:
        aggregates += [pl.col("correct").mean().alias("accuracy"), pl.col("reward").mean().alias("reward")]
    if "teacher_logprobs" in names:
        aggregates.append(((pl.col("rollout_logprobs").list.sum() - pl.col("teacher_logprobs").list.sum()).sum()
                           / pl.col("response_ids").list.len().sum()).alias("reverse_kl"))
    return frame.group_by("data_source").agg(aggregates).collect()


def kl_style(d: float) -> str:
    """Colour of one token by its reverse-KL term lp - lq (nats)."""
    if d > 2.0:
        return "bold white on red"
    if d > 0.5:
        return "red"
    if d > 0.1:
        return "yellow"
    if d < -0.5:
        return "cyan"
    return ""


def show_row(run: Path, iteration: int, row: int, console: Console) -> None:
    from common.modeling import load_tokenizer

    record = pl.read_parquet(shards.stage_dir(run, iteration, "scored") / "*.parquet").row(row, named=True)
    tokenizer = load_tokenizer(shards.checkpoint_dir(run, iteration))
    pieces = [tokenizer.decode([token]) for token in record["response_ids"]]
    diffs = [lp - lq for lp, lq in zip(record["rollout_logprobs"], record["teacher_logprobs"])]
    console.print(f"\nrow {row}: prompt {record['prompt_id']} sample {record['sample_idx']}, "
                  f"gold {record['ground_truth']}, extracted {record['extracted_answer']!r}, correct {record['correct']}, "
                  f"reverse KL {sum(diffs) / max(len(diffs), 1):.4f} per token", soft_wrap=True)
    response = Text()
    for piece, d in zip(pieces, diffs):
        response.append(piece, style=kl_style(d))
    console.print(response, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    # With top-k columns, the mechanism per token: how many of the teacher's top-k the student shares.
    topk = record.get("student_topk_ids") is not None and record.get("teacher_topk_ids") is not None
    extra = ("top-k overlap", "teacher's top 3") if topk else ()
    for name in ("pos", "token", "student lp", "teacher lp", "lp - lq", *extra):
        table.add_column(name, justify="right")
    columns = zip(pieces, record["rollout_logprobs"], record["teacher_logprobs"], diffs)
    for pos, (piece, lp, lq, d) in enumerate(columns):
        cells = [str(pos), repr(piece), f"{lp:.4f}", f"{lq:.4f}", f"{d:.4f}"]
        if topk:
            teacher_ids = record["teacher_topk_ids"][pos]
            cells += [f"{token_overlap(record['student_topk_ids'][pos], teacher_ids):.2f}",
                      " ".join(repr(tokenizer.decode([i])) for i in teacher_ids[:3])]
        table.add_row(*cells, style=kl_style(d))
    console.print(table)


def inspect(run: Path, iteration: int | None, row: int | None) -> None:
    run = require_run(run)
    iteration = require_iteration(run, iteration)
    rows = shards.read_manifest(shards.stage_dir(run, iteration, "scored")).rows
    if row is not None and not 0 <= row < rows:
        raise UserError(f"row {row} is not in iteration {iteration}", f"ROW must be in 0..{rows - 1}")
    # Colour only in a terminal; piped or captured output stays plain text.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and crush the token table
        console = Console(highlight=False, markup=False, width=160)
    with pl.Config(tbl_rows=20, tbl_cols=12, float_precision=4):
        for stage in ("rollouts", "scored", "eval"):
            path = shards.stage_dir(run, iteration, stage)
            manifest = shards.read_manifest(path)
            if manifest is None:
                continue
            print(f"\n{path} ({manifest.rows} rows, {manifest.seconds:.1f}s)")
            print(summary(path))
        train = shards.read_manifest(shards.stage_dir(run, iteration, "train"))
        if train is not None:
            print(f"\ntrain: {train.policy_version} -> {train.produced_version}")
            for key, value in train.metrics.items():
                print(f"  {key:<28} {value:.6g}")
    if row is not None:
        show_row(run, iteration, row, console)

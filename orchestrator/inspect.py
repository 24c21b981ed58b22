"""`make inspect`: polars summaries of one iteration's shards, and one response token by token."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from common import shards


def latest_iteration(run: Path) -> int:
    done = sorted(int(p.parent.name.split("=")[1]) for p in Path(run).glob("iter=*/scored/_MANIFEST.json"))
    if not done:
        raise SystemExit(f"error: {run} has no scored iteration yet")
    return done[-1]


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


def show_row(run: Path, iteration: int, row: int) -> None:
    from common.modeling import load_tokenizer

    scored = shards.stage_dir(run, iteration, "scored")
    frame = pl.read_parquet(scored / "*.parquet")
    if not 0 <= row < frame.height:
        raise SystemExit(f"error: ROW must be in 0..{frame.height - 1}")
    record = frame.row(row, named=True)
    tokenizer = load_tokenizer(shards.checkpoint_dir(run, iteration))
    print(f"\nrow {row}: prompt {record['prompt_id']} sample {record['sample_idx']}, gold {record['ground_truth']}, "
          f"extracted {record['extracted_answer']!r}, correct {record['correct']}")
    print(record["response_text"])
    print(f"\n{'pos':>4} {'token':>12} {'student lp':>10} {'teacher lp':>10} {'lp - lq':>8}")
    for pos, (token, lp, lq) in enumerate(zip(record["response_ids"], record["rollout_logprobs"],
                                              record["teacher_logprobs"])):
        print(f"{pos:>4} {tokenizer.decode([token])!r:>12} {lp:>10.4f} {lq:>10.4f} {lp - lq:>8.4f}")


def inspect(run: Path, iteration: int | None, row: int | None) -> None:
    iteration = latest_iteration(run) if iteration is None else iteration
    with pl.Config(tbl_rows=20, tbl_cols=12, float_precision=4):
        for stage in ("rollouts", "scored", "eval"):
            path = shards.stage_dir(run, iteration, stage)
            manifest = shards.read_manifest(path)
            if manifest is None:
                continue
            print(f"\n{path} ({manifest['rows']} rows, {manifest['seconds']:.1f}s)")
            print(summary(path))
        train = shards.read_manifest(shards.stage_dir(run, iteration, "train"))
        if train is not None:
            print(f"\ntrain: {train['policy_version']} -> {train['produced_version']}")
            for key, value in train["metrics"].items():
                print(f"  {key:<28} {value:.6g}")
        if row is not None:
            show_row(run, iteration, row)

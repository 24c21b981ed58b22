"""Five questions to a run's shards, one polars expression each (docs/tracking.md).

    python examples/look_at_a_run.py runs/readme 59
"""
import sys

import polars as pl

run, iteration = sys.argv[1], int(sys.argv[2])
pl.Config.set_tbl_rows(8).set_fmt_str_lengths(60).set_tbl_width_chars(120)
scored = pl.scan_parquet(f"{run}/iter={iteration:04d}/scored/*.parquet")
kl = pl.col("rollout_logprobs").list.sum() - pl.col("teacher_logprobs").list.sum()  # summed lp - lq of a response

print("1. accuracy by iteration and data_source")
print(pl.scan_parquet(f"{run}/iter=*/scored/*.parquet").group_by("iteration", "data_source")
      .agg(pl.col("correct").mean(), pl.len()).sort("iteration").collect())
print("2. the worst-KL responses (per token)")
print(scored.with_columns(kl=kl / pl.col("response_ids").list.len()).sort("kl", descending=True)
      .select("kl", "correct", "response_text").head(5).collect())
print("3. length distribution by finish_reason")
print(scored.group_by("finish_reason").agg(pl.len(), *[pl.col("response_ids").list.len().quantile(q).alias(
    f"p{int(q * 100)}") for q in (0.1, 0.5, 0.9)]).collect())
print("4. how the wrong answers fail")
print(scored.filter(~pl.col("correct")).group_by("verifier_status")
      .agg(pl.len(), pl.col("ground_truth", "extracted_answer").head(3)).collect())
print("5. where the reverse KL is (per token, correct vs wrong responses)")
print(scored.group_by("correct").agg(pl.len(), kl=kl.sum() / pl.col("response_ids").list.len().sum()).collect())

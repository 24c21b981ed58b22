"""Metric names that one component writes into a stage manifest and another reads: part of the shard
contract (common/shards.py), so writer and reader share one spelling. Each stage's other metrics are
named where they are computed (docs/tracking.md lists them)."""
from __future__ import annotations

# generate: the weight-sync gate (stages/generate/gate.py), read by the driver that seals the rollouts
GATE_GAP_MEAN = "generate/weight_sync_gap_mean"
GATE_GAP_MAX = "generate/weight_sync_gap_max"
GENERATE_VERIFY_SECONDS = "generate/verify_seconds"
# generate: read by the loop's length-health check (health.max_truncated_fraction)
TRUNCATED_FRACTION = "generate/truncated_fraction"
# score: the iteration's headline figures
REVERSE_KL = "rollout/reverse_kl"
ROLLOUT_ACCURACY = "rollout/accuracy"
# eval: the mean avg@k over the eval sets, read by the report and the benchmarks
EVAL_ACCURACY = "eval/accuracy"


def stage_seconds(folder: str) -> str:
    """The stage's own clock (its manifest's `seconds`: first shard's start to the folder being whole)."""
    return f"time/{folder}_stage_s"


def wall_seconds(stage: str) -> str:
    """How long the controller waited in the stage's phase of the loop (the same code in both modes)."""
    return f"time/{stage}_wall_s"

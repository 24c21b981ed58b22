"""Why distillation works or stalls, per iteration: the signals the OPD paper tracks.

- reverse KL (lp - lq on the sampled token) at the start, middle and end thirds of each response:
  where the student and teacher disagree;
- with top-k columns (generate.student_topk and score.teacher_topk > 0): the overlap of the
  student's and the teacher's top-k sets (successful runs climb from ~72% to over 91%) and the
  probability mass each model puts on the shared tokens.

The controller computes them while it seals the scored folder, between scoring and training: over
whole columns with numpy (millions of tokens an iteration at the card's scale), never token by token.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUCKETS = ("start", "middle", "end")
COLUMNS = ("rollout_logprobs", "teacher_logprobs")
# Read only when both models' top-k are stored (generate.student_topk and score.teacher_topk > 0).
TOPK_COLUMNS = ("student_topk_ids", "student_topk_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def position_third(position, length):
    """0, 1 or 2: the third of a response of `length` tokens that `position` lies in (ints or arrays)."""
    return np.minimum(3 * position // np.maximum(length, 1), 2)


def token_overlap(student_ids: list[int], teacher_ids: list[int]) -> float:
    return len(set(student_ids) & set(teacher_ids)) / max(len(teacher_ids), 1)


def sampled_logprobs(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lp, lq, each row's length): every response token's rollout and teacher log-prob, in row order."""
    rollout, teacher = (table[column].combine_chunks() for column in COLUMNS)
    return (pc.list_flatten(rollout).to_numpy(zero_copy_only=False),
            pc.list_flatten(teacher).to_numpy(zero_copy_only=False),
            pc.list_value_length(rollout).to_numpy(zero_copy_only=False))


def _pairs(table: pa.Table, ids: str, logprobs: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [row][token][k] top-k column pair as (token index, id, log-prob) per entry, tokens numbered in row order."""
    per_token = pc.list_flatten(table[ids].combine_chunks())
    return (pc.list_parent_indices(per_token).to_numpy(zero_copy_only=False),
            pc.list_flatten(per_token).to_numpy(zero_copy_only=False),
            pc.list_flatten(pc.list_flatten(table[logprobs].combine_chunks())).to_numpy(zero_copy_only=False))


def mechanism_metrics(table: pa.Table, sampled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                      ) -> dict[str, float]:
    """Iteration-level means over every response token (metric names: `mechanism/...`); `sampled`:
    sampled_logprobs(table), when the caller has it already."""
    lp, lq, lengths = sampled if sampled is not None else sampled_logprobs(table)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    third = position_third(np.arange(len(lp)) - starts, np.repeat(lengths, lengths))
    sums, counts = np.bincount(third, weights=lp - lq, minlength=3), np.bincount(third, minlength=3)
    metrics = {f"mechanism/reverse_kl_{b}": float(sums[t] / counts[t]) for t, b in enumerate(BUCKETS) if counts[t]}
    names = set(table.column_names)
    tokens = len(lp)
    if not set(TOPK_COLUMNS) <= names or not tokens:
        return metrics
    # One key per (token, id): an entry is shared when the other model's top-k at that token holds its id.
    s_token, s_id, s_lp = _pairs(table, "student_topk_ids", "student_topk_logprobs")
    t_token, t_id, t_lq = _pairs(table, "teacher_topk_ids", "teacher_topk_logprobs")
    width = int(max(s_id.max(initial=0), t_id.max(initial=0))) + 1
    s_key, t_key = s_token * width + s_id, t_token * width + t_id
    s_shared, t_shared = np.isin(s_key, t_key), np.isin(t_key, s_key)
    k_teacher = np.bincount(t_token, minlength=tokens)
    metrics.update({"mechanism/topk_overlap": float((1.0 / k_teacher[t_token[t_shared]]).sum() / tokens),
                    "mechanism/student_mass_on_shared": float(np.exp(s_lp[s_shared]).sum() / tokens),
                    "mechanism/teacher_mass_on_shared": float(np.exp(t_lq[t_shared]).sum() / tokens)})
    return metrics

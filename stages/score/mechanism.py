"""Why distillation works or stalls, per iteration: the signals the OPD paper tracks.

- reverse KL (lp - lq on the sampled token) at the start, middle and end thirds of each response:
  where the student and teacher disagree;
- with top-k columns (generate.student_topk and score.teacher_topk > 0): the overlap of the
  student's and the teacher's top-k sets (successful runs climb from ~72% to over 91%) and the
  probability mass each model puts on the shared tokens.
"""
from __future__ import annotations

import math

BUCKETS = ("start", "middle", "end")
COLUMNS = ("rollout_logprobs", "teacher_logprobs")
# Read only when both models' top-k are stored (generate.student_topk and score.teacher_topk > 0).
TOPK_COLUMNS = ("student_topk_ids", "student_topk_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def position_bucket(position: int, length: int) -> str:
    return BUCKETS[min(3 * position // max(length, 1), 2)]


def token_overlap(student_ids: list[int], teacher_ids: list[int]) -> float:
    return len(set(student_ids) & set(teacher_ids)) / max(len(teacher_ids), 1)


def mechanism_metrics(columns: dict) -> dict[str, float]:
    """Iteration-level means over every response token (metric names: `mechanism/...`)."""
    sums = {bucket: 0.0 for bucket in BUCKETS}
    counts = {bucket: 0 for bucket in BUCKETS}
    for rollout, teacher in zip(columns["rollout_logprobs"], columns["teacher_logprobs"]):
        for position, (lp, lq) in enumerate(zip(rollout, teacher)):
            bucket = position_bucket(position, len(rollout))
            sums[bucket] += lp - lq
            counts[bucket] += 1
    metrics = {f"mechanism/reverse_kl_{b}": sums[b] / counts[b] for b in BUCKETS if counts[b]}
    if "student_topk_ids" not in columns or "teacher_topk_ids" not in columns:
        return metrics
    overlap = student_mass = teacher_mass = 0.0
    tokens = 0
    rows = zip(columns["student_topk_ids"], columns["student_topk_logprobs"], columns["teacher_topk_ids"],
               columns["teacher_topk_logprobs"])
    for student_ids, student_lps, teacher_ids, teacher_lps in rows:
        for s_ids, s_lps, t_ids, t_lps in zip(student_ids, student_lps, teacher_ids, teacher_lps):
            shared = set(s_ids) & set(t_ids)
            overlap += len(shared) / max(len(t_ids), 1)
            student_mass += sum(math.exp(lp) for i, lp in zip(s_ids, s_lps) if i in shared)
            teacher_mass += sum(math.exp(lp) for i, lp in zip(t_ids, t_lps) if i in shared)
            tokens += 1
    if tokens:
        metrics.update({"mechanism/topk_overlap": overlap / tokens,
                        "mechanism/student_mass_on_shared": student_mass / tokens,
                        "mechanism/teacher_mass_on_shared": teacher_mass / tokens})
    return metrics

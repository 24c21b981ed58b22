"""Top-k signals end to end: the student's top-k recorded while sampling, the teacher's top-k and its
log-probs at the student's ids added by the scorer, the mechanism metrics, a top-k loss trained on
them, and `inspect` showing them token by token."""
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from pipeline_helpers import orchestrate

from common import shards
from stages.score.mechanism import mechanism_metrics, position_third


def test_mechanism_metrics_on_a_hand_made_example():
    columns = {
        "rollout_logprobs": [[-1.0, -1.0, -1.0, -2.0, -2.0, -2.0]],
        "teacher_logprobs": [[-1.5, -1.5, -1.0, -1.0, -3.0, -3.0]],
        "student_topk_ids": [[[1, 2]] * 6], "student_topk_logprobs": [[[math.log(0.6), math.log(0.3)]] * 6],
        "teacher_topk_ids": [[[2, 3]] * 6], "teacher_topk_logprobs": [[[math.log(0.5), math.log(0.4)]] * 6],
    }
    metrics = mechanism_metrics(pa.table(columns))
    assert [position_third(p, 6) for p in range(6)] == [0, 0, 1, 1, 2, 2]  # start, start, middle, ...
    assert metrics["mechanism/reverse_kl_start"] == pytest.approx(0.5)
    assert metrics["mechanism/reverse_kl_middle"] == pytest.approx(-0.5)
    assert metrics["mechanism/reverse_kl_end"] == pytest.approx(1.0)
    assert metrics["mechanism/topk_overlap"] == pytest.approx(0.5)          # {2} of {2, 3}
    assert metrics["mechanism/student_mass_on_shared"] == pytest.approx(0.3)  # the student's p(2)
    assert metrics["mechanism/teacher_mass_on_shared"] == pytest.approx(0.5)  # the teacher's p(2)
    # The end-to-end test's polars recomputation, checked here on the same example.
    assert recomputed_mechanism(pl.DataFrame(columns | {"response_ids": [[0] * 6]})) == pytest.approx(metrics)


def test_mechanism_metrics_equal_a_polars_recomputation_on_random_rows():
    """Rows of every length from 1 to 11, top-k sets of 3 (student) and 4 (teacher) ids drawn from 8, so
    that overlaps of 0 to 3 ids occur: the same metrics as the token-row joins below."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 12, size=40)
    columns = {"rollout_logprobs": [], "teacher_logprobs": [], "student_topk_ids": [], "student_topk_logprobs": [],
               "teacher_topk_ids": [], "teacher_topk_logprobs": [], "response_ids": []}
    for n in lengths:
        columns["rollout_logprobs"].append((-rng.random(n) * 3).tolist())
        columns["teacher_logprobs"].append((-rng.random(n) * 3).tolist())
        for who, k in (("student", 3), ("teacher", 4)):
            columns[f"{who}_topk_ids"].append([rng.choice(8, k, replace=False).tolist() for _ in range(n)])
            columns[f"{who}_topk_logprobs"].append([np.log(rng.dirichlet(np.ones(k + 1))[:k]).tolist() for _ in range(n)])
        columns["response_ids"].append([0] * int(n))
    ours = mechanism_metrics(pa.table({k: v for k, v in columns.items() if k != "response_ids"}))
    assert ours == pytest.approx(recomputed_mechanism(pl.DataFrame(columns)), rel=1e-12)
    assert 0.1 < ours["mechanism/topk_overlap"] < 0.9  # some ids shared, not all


def recomputed_mechanism(scored: pl.DataFrame) -> dict[str, float]:
    """The mechanism metrics from a scored shard, in polars (token rows, joins), not mechanism.py's loops."""
    tokens = (scored.with_row_index("row")
              .select("row", "rollout_logprobs", "teacher_logprobs", "student_topk_ids", "student_topk_logprobs",
                      "teacher_topk_ids", "teacher_topk_logprobs",
                      length=pl.col("response_ids").list.len(),
                      position=pl.int_ranges(pl.col("response_ids").list.len()))
              .explode("rollout_logprobs", "teacher_logprobs", "student_topk_ids", "student_topk_logprobs",
                       "teacher_topk_ids", "teacher_topk_logprobs", "position")
              .with_row_index("token"))
    third = pl.min_horizontal(3 * pl.col("position") // pl.col("length"), 2)
    kl = tokens.group_by(third.alias("third")).agg((pl.col("rollout_logprobs") - pl.col("teacher_logprobs")).mean())
    metrics = {f"mechanism/reverse_kl_{['start', 'middle', 'end'][t]}": v for t, v in kl.iter_rows()}
    student = tokens.select("token", id="student_topk_ids", lp="student_topk_logprobs").explode("id", "lp")
    teacher = tokens.select("token", id="teacher_topk_ids", lq="teacher_topk_logprobs").explode("id", "lq")
    shared = student.join(teacher, on=["token", "id"])  # one row per (token, id) in both top-k sets
    k_teacher = tokens["teacher_topk_ids"].list.len()
    return metrics | {"mechanism/topk_overlap": (1.0 / k_teacher.gather(shared["token"])).sum() / tokens.height,
                      "mechanism/student_mass_on_shared": shared["lp"].exp().sum() / tokens.height,
                      "mechanism/teacher_mass_on_shared": shared["lq"].exp().sum() / tokens.height}


@pytest.mark.slow  # a whole iteration; the loss itself: test_loss.py; vLLM's top-k columns: test_vllm.py
def test_reverse_kl_on_the_students_topk_end_to_end(tmp_path):
    run = tmp_path / "topk"
    result = orchestrate(run, 1, "-o", "generate.student_topk=4", "-o", "score.teacher_topk=4",
                         "-o", "train.loss=reverse_kl_topk", "-o", "eval.every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pl.read_parquet(shards.stage_dir(run, 0, "scored") / "*.parquet")
    lengths = scored["response_ids"].list.len()
    for column in ("student_topk_ids", "student_topk_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
                   "teacher_student_topk_logprobs"):
        assert (scored[column].list.len() == lengths).all(), column
    first = scored.row(0, named=True)
    assert all(len(ids) == 4 for ids in first["student_topk_ids"])
    metrics = shards.read_manifest(shards.stage_dir(run, 0, "scored")).metrics
    for name, value in recomputed_mechanism(scored).items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    train = shards.read_manifest(shards.stage_dir(run, 0, "train")).metrics
    assert train["train/loss"] > 0 and math.isfinite(train["train/grad_norm"])
    shown = subprocess.run([sys.executable, "-m", "orchestrator", "inspect", "--run", str(run), "--iter", "0",
                            "--row", "0"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "top-k overlap" in shown.stdout and "teacher's top 3" in shown.stdout

"""The generate stage's work on a worker, shard by shard: sample one shard's prompts on an engine holding
v_i (`sample_job`), grade it if it is an eval shard, write it (`run_job`). Which shards there are,
and the sealing, are the driver's (stages/generate/plan.py).
"""
from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from common import shards
from common.config import Config
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks
from common.modeling import load_tokenizer
from common.progress import Progress
from common.shards import file_sha256
from common.verifier import grade_batch
from common.verifier.status import ERROR, NO_ANSWER
from stages.generate.plan import SampledShard, ShardJob, eval_jobs, eval_metrics, train_prompts
from stages.generate.sampling import GenerationEngine


def render_prompt_sets(config: Config, run: Path, tokenizer_dir: Path) -> None:
    """Render the run's prompt sets into their cache (common/data.py: prepared_prompts), so that
    planning the first iteration finds them; a fresh run spends seconds here (the chat template over
    every prompt, and importing transformers)."""
    tokenizer = functools.cache(lambda: load_tokenizer(tokenizer_dir))
    train_prompts(config, run, tokenizer)
    if config.eval.every > 0:
        eval_jobs(config, run, tokenizer=tokenizer)


# ---- one shard ------------------------------------------------------------------------------

def rows_of(job: ShardJob, samples, tokenizer, iteration: int, version: str) -> list[dict]:
    rows = []
    for s in samples:
        prompt = job.prompts[s.prompt_index]
        rows.append({
            "prompt_id": prompt.prompt_id, "sample_idx": s.sample_idx, "iteration": iteration,
            "policy_version": version, "data_source": prompt.data_source, "ground_truth": prompt.ground_truth,
            "prompt_ids": prompt.prompt_ids, "response_ids": s.response_ids,
            "response_text": tokenizer.decode(s.response_ids, skip_special_tokens=True),
            "rollout_logprobs": s.logprobs, "finish_reason": s.finish_reason,
        })
        if s.topk_ids is not None:
            rows[-1].update(student_topk_ids=s.topk_ids, student_topk_logprobs=s.topk_logprobs)
    return rows


def graded(rows: list[dict], config: Config) -> list[dict]:
    s = config.score
    verdicts = grade_batch([(r["response_text"], r["ground_truth"]) for r in rows], s.reward_mode,
                           s.verifier_workers, s.verifier_timeout_s)
    for row, verdict in zip(rows, verdicts):
        row.update(reward=verdict.reward, correct=verdict.correct, extracted_answer=verdict.extracted_answer,
                   verifier_status=verdict.status)
    return rows


def sample_job(config: Config, iteration: int, job: ShardJob, engine: GenerationEngine, version: str
               ) -> tuple[list[dict], SampledShard]:
    """One shard's rows, sampled by `engine` (which holds `version`) and graded if it is an eval
    shard, and the summary sealing needs: rows, tokens, correct answers, timings."""
    started = time.time()
    reset_peaks()  # a resident worker reports this shard's peaks, not its lifetime's
    with Progress(len(job.prompts) * job.params.n, f"{job.folder} iter {iteration} shard {job.index}") as bar:
        samples = engine.sample([p.prompt_ids for p in job.prompts], job.params, bar.update)
    sample_seconds = time.time() - started
    rows = rows_of(job, samples, engine.tokenizer, iteration, version)
    if job.folder != "rollouts":
        rows = graded(rows, config)
    entropies = [s.entropy_sum for s in samples]
    correct_by_prompt: dict[str, int] = {}
    for row in rows:
        correct_by_prompt[row["prompt_id"]] = correct_by_prompt.get(row["prompt_id"], 0) + bool(row.get("correct"))
    return rows, SampledShard(
        index=job.index, rows=len(rows), response_tokens=sum(len(r["response_ids"]) for r in rows),
        truncated=sum(r["finish_reason"] == "length" for r in rows), sample_seconds=sample_seconds,
        entropy_sum=None if None in entropies else sum(entropies), started=started, finished=time.time(),
        peak_gpu_gib=peak_gpu_gib(), peak_rss_gib=peak_rss_gib(), eval_set=job.eval_set,
        correct=sum(r.get("correct", False) for r in rows),
        boxed=sum(r.get("verifier_status", NO_ANSWER) != NO_ANSWER for r in rows),
        verifier_errors=sum(r.get("verifier_status") == ERROR for r in rows),
        samples_per_prompt=job.params.n, correct_by_prompt=correct_by_prompt)


def run_job(config: Config, run: Path, iteration: int, job: ShardJob, engine: GenerationEngine,
            version: str) -> SampledShard:
    """Sample one shard (sample_job) and write it; returns its summary with the file's name and sha256."""
    rows, summary = sample_job(config, iteration, job, engine, version)
    stage = "rollouts" if job.folder == "rollouts" else "eval"
    schema = shards.schema_with_optional(stage, list(rows[0]))
    path = shards.write_shard(pa.Table.from_pylist(rows, schema=schema), shards.stage_dir(run, iteration, job.folder),
                              job.index)
    return replace(summary, file=path.name, sha256=file_sha256(path))


def evaluate_engine(config: Config, run: Path, engine: GenerationEngine, k: int | None = None,
                    sets: set[str] | None = None) -> dict[str, float]:
    """avg@k (and pass@k) of the model `engine` holds, with the run's eval sets and settings (only the
    sets named in `sets`, when given), writing nothing: the loop's evaluation without its shards, for
    the report's teacher line and bench-peers' checkpoints."""
    done = [sample_job(config, 0, job, engine, "")[1] for job in eval_jobs(config, run, k, lambda: engine.tokenizer)
            if sets is None or job.eval_set in sets]
    return eval_metrics(done, "eval")



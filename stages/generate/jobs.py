"""What the generate stage writes, shard by shard: rollouts of iteration i and the eval of v_i.

An iteration's prompts are cut into shards (`cut`: at least `generate.shards`, one per generation
worker by default, of at most `generate.rows_per_shard` responses); each shard is a job with its own
seed (common/seeds.py), so its samples depend only on its prompts, its seed and the weights: the
same bytes whichever worker samples it. The cut is frozen with the run's config (`generate.shards`
is resolved once, at the first start), so a run continued on another cluster writes the same bytes.
The eval sets are cut the same way. `run_job` samples one shard (and grades it, for the eval) and
writes it; `seal_rollouts` / `seal_eval` write the manifest once every shard is there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from common import shards
from common.config import Config
from common.data import Prompt, PromptSet, iteration_prompts, prepared_prompts
from common.errors import ConfigError
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks
from common.passk import ks_up_to, pass_at_k
from common.progress import Progress, stage_summary
from common.seeds import eval_seed, rollout_seed
from common.shards import file_sha256
from common.verifier import grade_batch
from common.verifier.status import ERROR, NO_ANSWER
from stages.generate.sampling import GenerationEngine, SamplingParams


@dataclass(frozen=True)
class ShardJob:
    folder: str               # rollouts | eval | eval-k<K>
    index: int                # part-<index>.parquet in that folder
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    eval_set: str = ""        # the eval set's name (its data_source), for the eval's metrics


@dataclass(frozen=True)
class SampledShard:
    """What one sampled shard tells the seal (and, over Dask, the controller): sample_job's summary,
    with run_job's file and the worker's gate and address added on the way."""
    index: int
    rows: int
    response_tokens: int
    truncated: int                 # responses cut at the length limit
    sample_seconds: float
    entropy_sum: float | None      # None where the engine does not see the whole distribution (vLLM: top-k)
    started: float
    finished: float
    peak_gpu_gib: float
    peak_rss_gib: float
    eval_set: str = ""
    correct: int = 0
    boxed: int = 0
    verifier_errors: int = 0
    samples_per_prompt: int = 1    # pass@k of the eval needs each prompt's count of correct samples of n
    correct_by_prompt: dict[str, int] = field(default_factory=dict)
    file: str = ""                 # part-<index>.parquet, once written
    sha256: str = ""
    gate: dict[str, float] = field(default_factory=dict)  # the worker's weight-sync gate figures
    worker: str = ""


def eval_folder(config: Config, k: int | None) -> str:
    return "eval" if (k or config.eval.k) == config.eval.k else f"eval-k{k}"


def cut(prompts: list[Prompt], n: int, config: Config) -> list[list[Prompt]]:
    """Whole prompt groups in order: at most `generate.rows_per_shard` responses per shard, and at
    least `generate.shards` shards (as many as there are prompts, when fewer)."""
    g = config.generate
    per_shard = max(1, g.rows_per_shard // n)
    if g.shards > 1:
        per_shard = min(per_shard, -(-len(prompts) // g.shards))
    return [prompts[start : start + per_shard] for start in range(0, len(prompts), per_shard)]


def train_prompts(config: Config, run: Path, tokenizer_dir: Path) -> PromptSet:
    prompt_set = prepared_prompts(run, "train", config.data.train, tokenizer_dir, config.data.max_prompt_tokens,
                                  config.data.enable_thinking)
    if not prompt_set.prompts:
        raise ConfigError(f"config key 'data.train': no usable prompts in {config.data.train} "
                          f"(dropped: {prompt_set.dropped_summary()})")
    return prompt_set


def render_prompt_sets(config: Config, run: Path, tokenizer_dir: Path) -> None:
    """Render the run's prompt sets into their cache (common/data.py: prepared_prompts), so that
    planning the first iteration finds them; a fresh run spends seconds here (the chat template over
    every prompt, and importing transformers)."""
    train_prompts(config, run, tokenizer_dir)
    if config.eval.every > 0:
        eval_jobs(config, run, tokenizer_dir)


def rollout_jobs(config: Config, run: Path, iteration: int, tokenizer_dir: Path) -> list[ShardJob]:
    g = config.generate
    prompts = iteration_prompts(train_prompts(config, run, tokenizer_dir).prompts, iteration, g.prompts_per_iteration,
                                config.seed)
    return [ShardJob("rollouts", index, tuple(chunk),
                     SamplingParams(n=g.n, max_new_tokens=g.max_response_tokens, temperature=g.temperature,
                                    top_p=g.top_p, seed=rollout_seed(config.seed, iteration, index),
                                    batch_size=g.batch_size, topk=g.student_topk))
            for index, chunk in enumerate(cut(prompts, g.n, config))]


def eval_jobs(config: Config, run: Path, tokenizer_dir: Path, k: int | None = None) -> list[ShardJob]:
    """Every eval set (avg@k), cut into shards; the same jobs for every checkpoint of the run."""
    e = config.eval
    k = k or e.k
    jobs: list[ShardJob] = []
    for set_index, path in enumerate(e.sets):
        prompt_set = prepared_prompts(run, f"eval-{set_index}-{Path(path).stem}", path, tokenizer_dir,
                                      config.data.max_prompt_tokens, config.data.enable_thinking, "eval.sets")
        prompts = prompt_set.prompts[: e.prompts] if e.prompts else prompt_set.prompts
        if not prompts:
            raise ConfigError(f"config key 'eval.sets': no usable prompts in {path} "
                              f"(dropped: {prompt_set.dropped_summary()})")
        name = prompts[0].data_source or Path(path).stem
        for shard, chunk in enumerate(cut(prompts, k, config)):
            params = SamplingParams(n=k, max_new_tokens=e.max_response_tokens, temperature=e.temperature,
                                    top_p=e.top_p, seed=eval_seed(config.seed, set_index, shard),
                                    batch_size=config.generate.batch_size)
            jobs.append(ShardJob(eval_folder(config, k), len(jobs), tuple(chunk), params, name))
    return jobs


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
    done = [sample_job(config, 0, job, engine, "")[1] for job in eval_jobs(config, run, engine.checkpoint, k)
            if sets is None or job.eval_set in sets]
    return eval_metrics(done, "eval")


# ---- sealing --------------------------------------------------------------------------------

def _throughput(done: list[SampledShard], started: float) -> dict:
    tokens = sum(d.response_tokens for d in done)
    return {"tokens": tokens, "stage_tokens_per_s": tokens / max(time.time() - started, 1e-9),
            "engine_tokens_per_s": tokens / max(sum(d.sample_seconds for d in done), 1e-9)}


def seal_rollouts(config: Config, run: Path, iteration: int, done: list[SampledShard], started: float, version: str,
                  dropped: dict[str, int], gate: dict[str, float]) -> dict:
    """The rollouts' manifest; `done` holds each shard's summary (run_job's, with the worker that ran it)."""
    rows = sum(d.rows for d in done)
    figures = _throughput(done, started)
    metrics = {
        "generate/response_tokens": figures["tokens"],
        "generate/mean_response_length": figures["tokens"] / rows,
        "generate/truncated_fraction": sum(d.truncated for d in done) / rows,
        # Mean entropy (nats) of the distributions the sampled tokens came from: with the truncated
        # fraction, the early signs of a length collapse (StableOPD). HF engine only.
        **({"generate/entropy": sum(d.entropy_sum for d in done) / max(figures["tokens"], 1)}
           if all(d.entropy_sum is not None for d in done) else {}),
        "generate/tokens_per_s": figures["stage_tokens_per_s"],       # the stage's, over its wall time
        "generate/engine_tokens_per_s": figures["engine_tokens_per_s"],  # one engine's, over its sampling time
        "generate/sample_seconds": sum(d.sample_seconds for d in done),
        "generate/shards": len(done),
        "generate/workers": len({d.worker for d in done}),
        "generate/peak_gpu_gib": max(d.peak_gpu_gib for d in done),  # the HF engine's (vLLM's is its EngineCore's)
        "generate/peak_rss_gib": max(d.peak_rss_gib for d in done),
        **{f"generate/dropped_{reason}": count for reason, count in dropped.items()},
        **gate,
    }
    out_dir = shards.stage_dir(run, iteration, "rollouts")
    manifest = shards.write_manifest(out_dir, "rollouts", iteration, started, metrics,
                                     {"policy_version": version})
    stage_summary("generate", iteration, manifest["rows"], figures["tokens"], metrics["generate/tokens_per_s"],
                  manifest["seconds"], f"mean length {metrics['generate/mean_response_length']:.1f}")
    return manifest


def eval_metrics(done: list[SampledShard], folder: str) -> dict[str, float]:
    """avg@k per eval set (`<folder>/<set>/accuracy`, ...) and their mean (`<folder>/accuracy`); with
    k >= 2 samples a prompt, the unbiased pass@k for k = 1, 2, 4, ... (`<folder>/<set>/pass@<k>`)."""
    metrics: dict[str, float] = {}
    for name in dict.fromkeys(d.eval_set for d in done):
        mine = [d for d in done if d.eval_set == name]
        rows = sum(d.rows for d in mine)
        metrics[f"{folder}/{name}/accuracy"] = sum(d.correct for d in mine) / rows
        n = mine[0].samples_per_prompt
        if n >= 2:
            counts = [c for d in mine for c in d.correct_by_prompt.values()]
            for k in ks_up_to(n):
                metrics[f"{folder}/{name}/pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
        metrics[f"{folder}/{name}/boxed_fraction"] = sum(d.boxed for d in mine) / rows
        metrics[f"{folder}/{name}/mean_response_length"] = sum(d.response_tokens for d in mine) / rows
        metrics[f"{folder}/{name}/verifier_errors"] = sum(d.verifier_errors for d in mine)
    accuracies = [value for key, value in metrics.items() if key.endswith("/accuracy")]
    metrics[f"{folder}/accuracy"] = sum(accuracies) / len(accuracies)
    metrics[f"{folder}/mean_response_length"] = sum(d.response_tokens for d in done) / sum(d.rows for d in done)
    return metrics


def seal_eval(config: Config, run: Path, iteration: int, folder: str, done: list[SampledShard], started: float, version: str,
              k: int) -> dict:
    metrics = eval_metrics(done, folder)
    figures = _throughput(done, started)
    out_dir = shards.stage_dir(run, iteration, folder)
    manifest = shards.write_manifest(out_dir, "eval", iteration, started, metrics,
                                     {"policy_version": version, "k": k})
    per_set = ", ".join(f"{key.split('/')[1]} {value:.3f}" for key, value in metrics.items()
                        if key.endswith("/accuracy") and key.count("/") == 2)
    if k >= 2:
        per_set += " | " + ", ".join(f"{key.split('/')[1]} pass@{k} {value:.3f}" for key, value in metrics.items()
                                     if key.endswith(f"/pass@{k}"))
    stage_summary("eval", iteration, manifest["rows"], figures["tokens"], figures["stage_tokens_per_s"],
                  manifest["seconds"], f"avg@{k} {per_set}")
    return manifest

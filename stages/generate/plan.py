"""The generate stage, planned and sealed: what a driver (the controller, `python -m stages.generate`) runs.

`plan_generation` says what iteration i still has to write (finished outputs are skipped) as shard
jobs: the eval of v_i when it is due, and iteration i's rollouts. `submit_generation` hands each job
to an executor (common/executors.py) as a `sample_task` (stages/generate/tasks.py: run on a worker's
engine holding v_i); `collect_generation` gathers their summaries (`SampledShard`) and seals each
folder. An iteration's prompts are cut into shards (`cut`: at least `generate.shards`, one per
generation worker by default, of at most `generate.rows_per_shard` responses); each shard is a job
with its own seed (common/seeds.py), so its samples depend only on its prompts, its seed and the
weights: the same bytes whichever worker, in whichever mode, samples it. The cut is frozen with the
run's config (`generate.shards` is resolved once, at the first start). Imports no model library.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import metrics as m
from common import shards
from common.config import Config
from common.data import Prompt, PromptSet, iteration_prompts, prepared_prompts
from common.devices import GENERATE
from common.errors import ConfigError
from common.executors import Executor, Task
from common.passk import ks_up_to, pass_at_k
from common.progress import stage_summary
from common.seeds import eval_seed, rollout_seed
from common.shards import policy_version
from stages.generate.sampling import SamplingParams

SAMPLE = Task("stages.generate.tasks", "sample_task")
RENDER = Task("stages.generate.tasks", "render_task")


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


Tokenizer = Callable[[], object] | None  # renders a prompt set not rendered yet; None in a driver (it reads them)


def train_prompts(config: Config, run: Path, tokenizer: Tokenizer = None) -> PromptSet:
    prompt_set = prepared_prompts(run, "train", config.data.train, config.data.max_prompt_tokens,
                                  config.data.enable_thinking, tokenizer=tokenizer)
    if not prompt_set.prompts:
        raise ConfigError(f"config key 'data.train': no usable prompts in {config.data.train} "
                          f"(dropped: {prompt_set.dropped_summary()})")
    return prompt_set


def rollout_jobs(config: Config, run: Path, iteration: int) -> list[ShardJob]:
    g = config.generate
    prompts = iteration_prompts(train_prompts(config, run).prompts, iteration, g.prompts_per_iteration,
                                config.seed)
    return [ShardJob("rollouts", index, tuple(chunk),
                     SamplingParams(n=g.n, max_new_tokens=g.max_response_tokens, temperature=g.temperature,
                                    top_p=g.top_p, seed=rollout_seed(config.seed, iteration, index),
                                    batch_size=g.batch_size, topk=g.student_topk))
            for index, chunk in enumerate(cut(prompts, g.n, config))]


def eval_jobs(config: Config, run: Path, k: int | None = None, tokenizer: Tokenizer = None) -> list[ShardJob]:
    """Every eval set (avg@k), cut into shards; the same jobs for every checkpoint of the run."""
    e = config.eval
    k = k or e.k
    jobs: list[ShardJob] = []
    for set_index, path in enumerate(e.sets):
        prompt_set = prepared_prompts(run, f"eval-{set_index}-{Path(path).stem}", path, config.data.max_prompt_tokens,
                                      config.data.enable_thinking, "eval.sets", tokenizer)
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


def eval_due(config: Config, iteration: int) -> bool:
    return config.eval.every > 0 and iteration % config.eval.every == 0


@dataclass
class GenerationPlan:
    """What iteration i's generate stage still has to write."""
    checkpoint: Path
    version: str
    k: int
    eval_folder: str
    eval_jobs: list[ShardJob] = field(default_factory=list)
    rollout_jobs: list[ShardJob] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # train prompts dropped at ingestion, by reason
    verify_seconds: float = 0.0  # checking v_i's policy files against their seal


def discard_stale(run: Path, iteration: int, version: str, folders: tuple[str, ...]) -> None:
    """Remove sealed outputs of iteration i sampled by another v_i than the one on disk now (v_i was
    trained again after a crash, and training is not bitwise reproducible on every device), with the
    scored shards made from stale rollouts."""
    for folder in folders:
        manifest = shards.read_manifest(shards.stage_dir(run, iteration, folder))
        if manifest is not None and manifest.policy_version not in (None, version):
            print(f"warning: iter={iteration:04d}/{folder} was sampled by {manifest.policy_version}, not "
                  f"{version}; sampling it again", flush=True)
            shards.reset_stage(shards.stage_dir(run, iteration, folder))
            if folder == "rollouts":
                shards.reset_stage(shards.stage_dir(run, iteration, "scored"))


def plan_generation(config: Config, run: Path, iteration: int, eval_only: bool = False,
                    eval_k: int | None = None, trusted: bool = False) -> GenerationPlan | None:
    """The jobs left for iteration i (None when nothing is), after clearing unsealed or stale outputs.
    Raises ContractError when v_i's policy is missing or altered; `trusted`: its writer's hashes
    were handed to this process in this run, so only the files' sizes are checked."""
    checkpoint = shards.checkpoint_dir(run, iteration)
    verify_started = time.time()
    shards.verify_policy(checkpoint, trusted)
    verify_seconds = time.time() - verify_started
    version = policy_version(checkpoint)
    folder = eval_folder(config, eval_k)
    discard_stale(run, iteration, version, (folder, "rollouts"))
    want_eval = (eval_only or eval_due(config, iteration)) and not shards.stage_finished(
        shards.stage_dir(run, iteration, folder))
    want_rollouts = not eval_only and not shards.stage_finished(shards.stage_dir(run, iteration, "rollouts"))
    if not (want_eval or want_rollouts):
        return None
    plan = GenerationPlan(checkpoint, version, eval_k or config.eval.k, folder, verify_seconds=verify_seconds)
    # The prompt sets were rendered at the run's start (render_task): read from the run folder.
    if want_eval:
        shards.reset_stage(shards.stage_dir(run, iteration, folder))
        plan.eval_jobs = eval_jobs(config, run, eval_k)
    if want_rollouts:
        shards.reset_stage(shards.stage_dir(run, iteration, "rollouts"))
        plan.rollout_jobs = rollout_jobs(config, run, iteration)
        plan.dropped = train_prompts(config, run).dropped
    return plan


def seal_plan(config: Config, run: Path, iteration: int, plan: GenerationPlan, eval_done: list[SampledShard],
              rollouts_done: list[SampledShard], gate: dict) -> None:
    if plan.eval_jobs:
        seal_eval(config, run, iteration, plan.eval_folder, sorted(eval_done, key=lambda d: d.index), plan.version,
                  plan.k)
    if plan.rollout_jobs:
        seal_rollouts(config, run, iteration, sorted(rollouts_done, key=lambda d: d.index), plan.version,
                      plan.dropped, {m.GENERATE_VERIFY_SECONDS: plan.verify_seconds, **gate})


# ---- sealing --------------------------------------------------------------------------------

def _throughput(done: list[SampledShard]) -> dict:
    """A stage's clock runs from its first shard's start to its last shard's end, in every executor."""
    tokens = sum(d.response_tokens for d in done)
    started, finished = min(d.started for d in done), max(d.finished for d in done)
    return {"tokens": tokens, "started": started, "finished": finished,
            "stage_tokens_per_s": tokens / max(finished - started, 1e-9),
            "engine_tokens_per_s": tokens / max(sum(d.sample_seconds for d in done), 1e-9)}


def seal_rollouts(config: Config, run: Path, iteration: int, done: list[SampledShard], version: str,
                  dropped: dict[str, int], gate: dict[str, float]) -> shards.Manifest:
    """The rollouts' manifest; `done` holds each shard's summary (run_job's, with the worker that ran it)."""
    rows = sum(d.rows for d in done)
    figures = _throughput(done)
    metrics = {
        "generate/response_tokens": figures["tokens"],
        "generate/mean_response_length": figures["tokens"] / rows,
        m.TRUNCATED_FRACTION: sum(d.truncated for d in done) / rows,
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
    manifest = shards.write_manifest(out_dir, "rollouts", iteration, figures["started"], metrics,
                                     figures["finished"], policy_version=version)
    stage_summary("generate", iteration, manifest.rows, figures["tokens"], metrics["generate/tokens_per_s"],
                  manifest.seconds, f"mean length {metrics['generate/mean_response_length']:.1f}")
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


def seal_eval(config: Config, run: Path, iteration: int, folder: str, done: list[SampledShard], version: str,
              k: int) -> shards.Manifest:
    metrics = eval_metrics(done, folder)
    figures = _throughput(done)
    out_dir = shards.stage_dir(run, iteration, folder)
    manifest = shards.write_manifest(out_dir, "eval", iteration, figures["started"], metrics,
                                     figures["finished"], policy_version=version, k=k)
    per_set = ", ".join(f"{key.split('/')[1]} {value:.3f}" for key, value in metrics.items()
                        if key.endswith("/accuracy") and key.count("/") == 2)
    if k >= 2:
        per_set += " | " + ", ".join(f"{key.split('/')[1]} pass@{k} {value:.3f}" for key, value in metrics.items()
                                     if key.endswith(f"/pass@{k}"))
    stage_summary("eval", iteration, manifest.rows, figures["tokens"], figures["stage_tokens_per_s"],
                  manifest.seconds, f"avg@{k} {per_set}")
    return manifest


# ---- the driver -----------------------------------------------------------------------------

@dataclass
class Sampling:
    """A generate stage in flight: its plan and the handles of its eval and rollout tasks."""
    plan: GenerationPlan
    evals: list
    rollouts: list


def render_prompts(executor: Executor, run: Path, iteration: int) -> None:
    """Render the run's prompt sets with v_i's tokenizer on a generation worker, if not done yet (the
    loop renders them at the run's start; a stage or eval command run alone needs it first)."""
    executor.gather(GENERATE, iteration, [executor.submit(RENDER, run, iteration, role=GENERATE)])


def submit_generation(executor: Executor, config: Config, run: Path, iteration: int, eval_only: bool = False,
                      eval_k: int | None = None, trusted: bool = False) -> Sampling | None:
    """Plan iteration i's generate stage and submit its jobs (None when nothing is left to do)."""
    plan = plan_generation(config, run, iteration, eval_only, eval_k, trusted)
    if plan is None:
        return None
    evals = [executor.submit(SAMPLE, run, iteration, job, role=GENERATE) for job in plan.eval_jobs]
    rollouts = [executor.submit(SAMPLE, run, iteration, job, role=GENERATE) for job in plan.rollout_jobs]
    return Sampling(plan, evals, rollouts)


def collect_generation(executor: Executor, config: Config, run: Path, iteration: int,
                       sampling: Sampling | None) -> None:
    """Wait for the stage's shards, then seal its folders (the eval's, the rollouts')."""
    if sampling is None:
        return
    eval_done = executor.gather(GENERATE, iteration, sampling.evals)
    rollouts_done = executor.gather(GENERATE, iteration, sampling.rollouts)
    # The gate figures of the worst-synced engine that sampled (every engine passed the gate).
    gate = max((d.gate for d in eval_done + rollouts_done), key=lambda g: g.get(m.GATE_GAP_MEAN, 0.0), default={})
    seal_plan(config, run, iteration, sampling.plan, eval_done, rollouts_done, gate)

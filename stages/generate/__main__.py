"""Generate stage: sample the current policy on this iteration's prompts -> rollout shards.

    python -m stages.generate --run runs/tiny --iter 3 [--eval-only [--eval-k K]]

Loads checkpoint v_i, samples n responses per prompt at temperature 1 and writes
iter=i/rollouts/. When the iteration is due for evaluation (eval.every) it also samples the eval
sets with the eval settings (avg@k), grades them and writes iter=i/eval/. Finished outputs are skipped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pyarrow as pa

from common import shards
from common.cluster import resident_models
from common.config import Config, ConfigError
from common.data import Prompt, iteration_prompts, prepared_prompts
from common.modeling import peak_gpu_gib, policy_version
from common.progress import Progress, stage_summary
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.generate.sampling import GenerationEngine, SamplingParams, open_engine
from stages.score.verifier import grade_batch



def rollout_rows(prompts: list[Prompt], samples, tokenizer, iteration: int, version: str) -> list[dict]:
    rows = []
    for s in samples:
        prompt = prompts[s.prompt_index]
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


def write_rows(rows: list[dict], stage: str, out_dir: Path, rows_per_shard: int) -> None:
    schema = shards.schema_with_optional(stage, list(rows[0]) if rows else [])
    for index, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        shards.write_shard(pa.Table.from_pylist(rows[start : start + rows_per_shard], schema=schema), out_dir, index)


def run_sampling(engine: GenerationEngine, prompts: list[Prompt], params: SamplingParams, label: str):
    with Progress(len(prompts) * params.n, label) as bar:
        return engine.sample([p.prompt_ids for p in prompts], params, bar.update)


def generate_rollouts(config: Config, run: Path, iteration: int, engine: GenerationEngine, version: str) -> dict:
    tokenizer = engine.tokenizer
    out_dir = shards.stage_dir(run, iteration, "rollouts")
    shards.reset_stage(out_dir)
    started = time.time()
    prompt_set = prepared_prompts(run, "train", config.data.train, tokenizer, config.data.max_prompt_tokens,
                                  config.data.enable_thinking)
    if not prompt_set.prompts:
        raise ConfigError(f"config key 'data.train': no usable prompts in {config.data.train} "
                          f"(dropped: {prompt_set.dropped_summary()})")
    prompts = iteration_prompts(prompt_set.prompts, iteration, config.generate.prompts_per_iteration, config.seed)
    g = config.generate
    params = SamplingParams(n=g.n, max_new_tokens=g.max_response_tokens, temperature=g.temperature,
                            top_p=g.top_p, seed=config.seed * 100_003 + iteration, batch_size=g.batch_size,
                            topk=g.student_topk)
    sample_started = time.time()
    samples = run_sampling(engine, prompts, params, f"generate iter {iteration}")
    sample_seconds = time.time() - sample_started
    rows = rollout_rows(prompts, samples, tokenizer, iteration, version)
    write_rows(rows, "rollouts", out_dir, g.rows_per_shard)
    tokens = sum(len(r["response_ids"]) for r in rows)
    metrics = {
        "generate/response_tokens": tokens,
        "generate/mean_response_length": tokens / len(rows),
        "generate/truncated_fraction": sum(r["finish_reason"] == "length" for r in rows) / len(rows),
        "generate/tokens_per_s": tokens / max(sample_seconds, 1e-9),
        "generate/peak_gpu_gib": peak_gpu_gib(),  # the HF engine's (vLLM's lives in its EngineCore)
        **{f"generate/dropped_{reason}": count for reason, count in prompt_set.dropped.items()},
    }
    manifest = shards.write_manifest(out_dir, "rollouts", iteration, config.hash(), started, metrics,
                                     {"policy_version": version})
    stage_summary("generate", iteration, manifest["rows"], tokens, metrics["generate/tokens_per_s"],
                  manifest["seconds"], f"mean length {metrics['generate/mean_response_length']:.1f}")
    return manifest


def evaluate(config: Config, run: Path, iteration: int, engine: GenerationEngine, version: str,
             k: int | None = None) -> dict:
    """avg@k accuracy of checkpoint v_i on every set of `eval.sets`, graded by the verifier.

    Writes iter=i/eval/ (or iter=i/eval-k{K}/ when `k` differs from the config's eval.k) with one row
    per sample; metrics per set are `<folder>/<data_source>/accuracy` and an overall mean.
    """
    e, tokenizer = config.eval, engine.tokenizer
    k = k or e.k
    folder = "eval" if k == e.k else f"eval-k{k}"
    out_dir = shards.stage_dir(run, iteration, folder)
    shards.reset_stage(out_dir)
    started = time.time()
    params = SamplingParams(n=k, max_new_tokens=e.max_response_tokens, temperature=e.temperature, top_p=e.top_p,
                            seed=config.seed * 100_003 + 7_777, batch_size=config.generate.batch_size)
    rows, metrics = [], {}
    sample_seconds = 0.0
    for index, path in enumerate(e.sets):
        prompt_set = prepared_prompts(run, f"eval-{index}-{Path(path).stem}", path, tokenizer,
                                      config.data.max_prompt_tokens, config.data.enable_thinking, "eval.sets")
        prompts = prompt_set.prompts[: e.prompts] if e.prompts else prompt_set.prompts
        if not prompts:
            raise ConfigError(f"config key 'eval.sets': no usable prompts in {path} (dropped: {prompt_set.dropped_summary()})")
        sample_started = time.time()
        samples = run_sampling(engine, prompts, params, f"eval {Path(path).stem} iter {iteration}")
        sample_seconds += time.time() - sample_started
        set_rows = rollout_rows(prompts, samples, tokenizer, iteration, version)
        verdicts = grade_batch([(r["response_text"], r["ground_truth"]) for r in set_rows], config.score.reward_mode,
                               config.score.verifier_workers, config.score.verifier_timeout_s)
        for row, verdict in zip(set_rows, verdicts):
            row.update(reward=verdict.reward, correct=verdict.correct, extracted_answer=verdict.extracted_answer,
                       verifier_status=verdict.status)
        name = prompts[0].data_source or Path(path).stem
        metrics[f"{folder}/{name}/accuracy"] = sum(r["correct"] for r in set_rows) / len(set_rows)
        metrics[f"{folder}/{name}/boxed_fraction"] = sum(r["verifier_status"] != "no_answer" for r in set_rows) / len(set_rows)
        metrics[f"{folder}/{name}/mean_response_length"] = sum(len(r["response_ids"]) for r in set_rows) / len(set_rows)
        rows += set_rows
    write_rows(rows, "eval", out_dir, config.generate.rows_per_shard)
    accuracies = [value for key, value in metrics.items() if key.endswith("/accuracy")]
    metrics[f"{folder}/accuracy"] = sum(accuracies) / len(accuracies)  # mean over sets
    metrics[f"{folder}/mean_response_length"] = sum(len(r["response_ids"]) for r in rows) / len(rows)
    manifest = shards.write_manifest(out_dir, "eval", iteration, config.hash(), started, metrics,
                                     {"policy_version": version, "k": k})
    per_set = ", ".join(f"{key.split('/')[1]} {value:.3f}" for key, value in metrics.items()
                        if key.endswith("/accuracy") and key.count("/") == 2)
    tokens = sum(len(r["response_ids"]) for r in rows)
    stage_summary("eval", iteration, manifest["rows"], tokens, tokens / max(sample_seconds, 1e-9), manifest["seconds"],
                  f"avg@{k} {per_set}")
    return manifest


def eval_due(config: Config, iteration: int) -> bool:
    return config.eval.every > 0 and iteration % config.eval.every == 0


def generate_stage(config: Config, run: Path, iteration: int, engine_for: Callable[[Path], GenerationEngine],
                   eval_only: bool = False, eval_k: int | None = None) -> GenerationEngine | None:
    """Evaluate v_i when due and sample iteration i's rollouts, skipping finished outputs.

    `engine_for(checkpoint)` returns an engine holding that policy: a new one, or (resident mode)
    the worker's engine pointed at it in place. Returns it, or None when there was nothing to do.
    """
    checkpoint = shards.checkpoint_dir(run, iteration)
    shards.verify_checkpoint(checkpoint)
    k = eval_k or config.eval.k
    eval_dir = shards.stage_dir(run, iteration, "eval" if k == config.eval.k else f"eval-k{k}")
    want_eval = (eval_only or eval_due(config, iteration)) and not shards.stage_finished(eval_dir)
    want_rollouts = not eval_only and not shards.stage_finished(shards.stage_dir(run, iteration, "rollouts"))
    if not (want_eval or want_rollouts):
        return None
    version = policy_version(checkpoint)
    engine = engine_for(checkpoint)
    if want_eval:
        evaluate(config, run, iteration, engine, version, k)
    if want_rollouts:
        generate_rollouts(config, run, iteration, engine, version)
    return engine


def generate_on_worker(run: Path, iteration: int, eval_only: bool = False, eval_k: int | None = None) -> None:
    """Resident mode: the generate stage as a Dask task, on the worker's resident engine."""
    config = load_run_config(run)
    set_threads(config)
    models = resident_models()
    generate_stage(config, run, iteration, lambda checkpoint: models.generation_engine(config, checkpoint),
                   eval_only, eval_k)


def main() -> None:
    parser = stage_arguments(__doc__)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate checkpoint v_i")
    parser.add_argument("--eval-k", type=int, default=None, help="samples per eval prompt (default: eval.k)")
    args = parser.parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
    except ConfigError as error:
        fail(str(error))
    set_threads(config)
    try:
        engine = generate_stage(config, args.run, args.iteration, lambda checkpoint: open_engine(config, checkpoint),
                                args.eval_only, args.eval_k)
    except shards.ContractError as error:
        fail(f"{error}: train iteration {args.iteration - 1} (again) first")
    except (ConfigError, ImportError) as error:
        fail(str(error))
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()

"""Generate stage: sample the current policy on this iteration's prompts -> rollout shards.

    python -m stages.generate --run runs/tiny --iter 3 [--eval-only]

Loads checkpoint v_i, samples n responses per prompt at temperature 1 and writes
iter=i/rollouts/. When the iteration is due for evaluation (eval.every) it also samples the eval
split with the eval settings, grades it and writes iter=i/eval/. Finished outputs are skipped.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from common import shards
from common.config import Config, ConfigError
from common.data import Prompt, iteration_prompts, prepared_prompts
from common.modeling import load_model, load_tokenizer, policy_version
from common.progress import Progress, stage_summary
from common.reward import grade
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.generate.hf_engine import SamplingParams, sample

SHARD_ROWS = 1024


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
    return rows


def write_rows(rows: list[dict], schema: pa.Schema, out_dir: Path) -> None:
    for index, start in enumerate(range(0, max(len(rows), 1), SHARD_ROWS)):
        shards.write_shard(pa.Table.from_pylist(rows[start : start + SHARD_ROWS], schema=schema), out_dir, index)


def run_sampling(model, tokenizer, prompts: list[Prompt], params: SamplingParams, label: str):
    eos_ids = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id})
    with Progress(len(prompts) * params.n, label) as bar:
        return sample(model, [p.prompt_ids for p in prompts], params, eos_ids, tokenizer.pad_token_id, bar.update)


def generate_rollouts(config: Config, run: Path, iteration: int, model, tokenizer, version: str) -> dict:
    out_dir = shards.stage_dir(run, iteration, "rollouts")
    shards.reset_stage(out_dir)
    started = time.time()
    prompt_set = prepared_prompts(run, "train", config.data.train, tokenizer, config.data.max_prompt_tokens,
                                  config.data.enable_thinking)
    if not prompt_set.prompts:
        raise ConfigError(f"data.train: no usable prompts in {config.data.train}")
    prompts = iteration_prompts(prompt_set.prompts, iteration, config.generate.prompts_per_iteration, config.seed)
    g = config.generate
    params = SamplingParams(n=g.n, max_new_tokens=g.max_response_tokens, temperature=g.temperature,
                            top_p=g.top_p, seed=config.seed * 100_003 + iteration, batch_size=g.batch_size)
    sample_started = time.time()
    samples = run_sampling(model, tokenizer, prompts, params, f"generate iter {iteration}")
    sample_seconds = time.time() - sample_started
    rows = rollout_rows(prompts, samples, tokenizer, iteration, version)
    write_rows(rows, shards.ROLLOUT_SCHEMA, out_dir)
    tokens = sum(len(r["response_ids"]) for r in rows)
    metrics = {
        "generate/response_tokens": tokens,
        "generate/mean_response_length": tokens / len(rows),
        "generate/truncated_fraction": sum(r["finish_reason"] == "length" for r in rows) / len(rows),
        "generate/tokens_per_s": tokens / max(sample_seconds, 1e-9),
        "generate/dropped_too_long": prompt_set.dropped_too_long,
    }
    manifest = shards.write_manifest(out_dir, "rollouts", iteration, config.hash(), started, metrics,
                                     {"policy_version": version})
    stage_summary("generate", iteration, manifest["rows"], tokens, metrics["generate/tokens_per_s"],
                  manifest["seconds"],
                  f"mean length {metrics['generate/mean_response_length']:.1f}")
    return manifest


def evaluate(config: Config, run: Path, iteration: int, model, tokenizer, version: str) -> dict:
    out_dir = shards.stage_dir(run, iteration, "eval")
    shards.reset_stage(out_dir)
    started = time.time()
    prompt_set = prepared_prompts(run, "eval", config.data.eval, tokenizer, config.data.max_prompt_tokens,
                                  config.data.enable_thinking)
    prompts = prompt_set.prompts[: config.eval.prompts]
    e = config.eval
    params = SamplingParams(n=1, max_new_tokens=e.max_response_tokens, temperature=e.temperature, top_p=e.top_p,
                            seed=config.seed * 100_003 + 7_777, batch_size=config.generate.batch_size)
    sample_started = time.time()
    samples = run_sampling(model, tokenizer, prompts, params, f"eval iter {iteration}")
    sample_seconds = time.time() - sample_started
    rows = rollout_rows(prompts, samples, tokenizer, iteration, version)
    for row in rows:
        verdict = grade(row["response_text"], row["ground_truth"])
        row.update(reward=verdict.reward, correct=verdict.correct, extracted_answer=verdict.extracted_answer,
                   verifier_status=verdict.status)
    write_rows(rows, shards.EVAL_SCHEMA, out_dir)
    metrics = {"eval/accuracy": sum(r["correct"] for r in rows) / len(rows),
               "eval/boxed_fraction": sum(r["verifier_status"] != "no_answer" for r in rows) / len(rows),
               "eval/mean_response_length": sum(len(r["response_ids"]) for r in rows) / len(rows)}
    manifest = shards.write_manifest(out_dir, "eval", iteration, config.hash(), started, metrics,
                                     {"policy_version": version})
    tokens = sum(len(r["response_ids"]) for r in rows)
    stage_summary("eval", iteration, manifest["rows"], tokens, tokens / max(sample_seconds, 1e-9), manifest["seconds"],
                  f"accuracy {metrics['eval/accuracy']:.3f}")
    return manifest


def eval_due(config: Config, iteration: int) -> bool:
    return config.eval.every > 0 and iteration % config.eval.every == 0


def main() -> None:
    parser = stage_arguments(__doc__)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate checkpoint v_i")
    args = parser.parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
    except ConfigError as error:
        fail(str(error))
    set_threads(config)
    checkpoint = shards.checkpoint_dir(args.run, args.iteration)
    if not shards.checkpoint_ready(checkpoint):
        fail(f"checkpoint {checkpoint} is not complete: train iteration {args.iteration - 1} first")
    version = policy_version(checkpoint)
    tokenizer, model = load_tokenizer(checkpoint), load_model(checkpoint)
    want_eval = args.eval_only or eval_due(config, args.iteration)
    if want_eval and shards.read_manifest(shards.stage_dir(args.run, args.iteration, "eval")) is None:
        evaluate(config, args.run, args.iteration, model, tokenizer, version)
    if not args.eval_only and shards.read_manifest(shards.stage_dir(args.run, args.iteration, "rollouts")) is None:
        try:
            generate_rollouts(config, args.run, args.iteration, model, tokenizer, version)
        except ConfigError as error:
            fail(str(error))


if __name__ == "__main__":
    main()

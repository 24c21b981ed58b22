"""Score stage: teacher log-prob of every sampled token, plus the rule reward -> scored shards.

    python -m stages.score --run runs/tiny --iter 3

Reads iter=i/rollouts/ and maps over its shards on a Dask cluster (an in-process one unless
`cluster.address` names a scheduler): on each worker the resident teacher (stages/score/teacher.py)
scores a shard while the verifier grades it, and scored shard k is rollout shard k plus the teacher
columns and rewards. The driver then seals iter=i/scored/ with the iteration's metrics.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import shards
from distributed import get_worker

from common.cluster import open_client, resident_models
from common.config import Config, ConfigError
from common.modeling import load_tokenizer, local_model_dir, peak_gpu_gib, policy_version
from common.progress import Progress, stage_summary
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.score.mechanism import mechanism_metrics
from stages.score.verifier import grade_batch


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares log-probs of the same token ids: the vocabularies must be identical."""
    if len(student_tokenizer) != len(teacher_tokenizer):
        raise ConfigError(f"model.teacher: vocabulary size {len(teacher_tokenizer)} != student's {len(student_tokenizer)}")
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if teacher_vocab.get(token) != index:
            raise ConfigError(f"model.teacher: token {token!r} has id {teacher_vocab.get(token)} in the teacher, "
                              f"{index} in the student")


def score_shard(run: Path, iteration: int, index: int, rollout_file: Path) -> dict:
    """On a Dask worker: teacher columns and grades for one rollout shard -> scored shard `index`."""
    config = load_run_config(run)
    set_threads(config)
    teacher_dir = local_model_dir(config.model.teacher)
    scorer = resident_models().teacher(config, teacher_dir)
    rollouts = pq.read_table(rollout_file)
    columns = rollouts.to_pydict()
    sc = config.score
    # The verifier works in its own processes: grade while the teacher runs.
    with ThreadPoolExecutor(1) as background:
        grading = background.submit(grade_batch, list(zip(columns["response_text"], columns["ground_truth"])),
                                    sc.reward_mode, sc.verifier_workers, sc.verifier_timeout_s)
        started = time.time()
        teacher_columns = scorer.score(columns)
        forward_seconds = time.time() - started
        grades = grading.result()
    scored = rollouts
    for name, values in teacher_columns.items():
        scored = scored.append_column(name, pa.array(values))  # `conform` casts to the contract's types
    scored = scored.append_column("teacher_version", pa.array([policy_version(teacher_dir)] * len(grades)))
    scored = scored.append_column("reward", pa.array([g.reward for g in grades], pa.float32()))
    scored = scored.append_column("correct", pa.array([g.correct for g in grades]))
    scored = scored.append_column("extracted_answer", pa.array([g.extracted_answer for g in grades], pa.string()))
    scored = scored.append_column("verifier_status", pa.array([g.status for g in grades]))
    shards.write_shard(shards.conform(scored, "scored"), shards.stage_dir(run, iteration, "scored"), index)
    return {"forward_seconds": forward_seconds, "peak_gpu_gib": peak_gpu_gib(), "worker": get_worker().address}


def score_stage(config: Config, run: Path, iteration: int, client) -> dict | None:
    """Score iteration i's rollouts on the workers of `client` and seal iter=i/scored/."""
    out_dir = shards.stage_dir(run, iteration, "scored")
    if shards.stage_finished(out_dir):
        return None
    rollouts_dir = shards.stage_dir(run, iteration, "rollouts")
    files = [rollouts_dir / entry["name"] for entry in shards.verify_stage(rollouts_dir)["files"]]
    teacher_dir = local_model_dir(config.model.teacher)
    check_same_vocabulary(load_tokenizer(shards.checkpoint_dir(run, iteration)), load_tokenizer(teacher_dir))
    shards.reset_stage(out_dir)
    started = time.time()
    futures = client.map(score_shard, [run] * len(files), [iteration] * len(files), range(len(files)), files,
                         pure=False)
    per_shard = []
    with Progress(len(files), f"score iter {iteration}", unit="shard") as bar:
        for future in futures:
            per_shard.append(future.result())
            bar.update(1)
    columns = shards.read_files(out_dir, "scored").to_pydict()
    scores = columns["teacher_logprobs"]
    tokens = sum(map(len, scores))
    forward_tokens = tokens + sum(map(len, columns["prompt_ids"]))  # what the teacher ran over
    reverse_kl = sum(r - t for rl, sl in zip(columns["rollout_logprobs"], scores) for r, t in zip(rl, sl))
    rows = len(scores)
    metrics = {
        # Shards run in parallel on several workers: throughput is over the stage's wall time.
        "score/tokens_per_s": forward_tokens / max(time.time() - started, 1e-9),
        "score/teacher_forward_s": sum(s["forward_seconds"] for s in per_shard),
        "rollout/reverse_kl": reverse_kl / max(tokens, 1),
        "rollout/reward_mean": sum(columns["reward"]) / rows,
        "rollout/accuracy": sum(columns["correct"]) / rows,
        "rollout/boxed_fraction": sum(s != "no_answer" for s in columns["verifier_status"]) / rows,
        "rollout/teacher_logprob_mean": sum(map(sum, scores)) / max(tokens, 1),
        "score/peak_gpu_gib": max(s["peak_gpu_gib"] for s in per_shard),
        "score/workers": len({s["worker"] for s in per_shard}),
        **mechanism_metrics(columns),
    }
    manifest = shards.write_manifest(out_dir, "scored", iteration, config.hash(), started, metrics,
                                     {"teacher_version": policy_version(teacher_dir)})
    stage_summary("score", iteration, manifest["rows"], forward_tokens, metrics["score/tokens_per_s"],
                  manifest["seconds"],
                  f"accuracy {metrics['rollout/accuracy']:.3f}, reverse KL {metrics['rollout/reverse_kl']:.4f}")
    return manifest


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        if shards.stage_finished(shards.stage_dir(args.run, args.iteration, "scored")):
            return
        set_threads(config)
        with open_client(config, processes=False) as client:
            score_stage(config, args.run, args.iteration, client)
    except (ConfigError, shards.ContractError, ImportError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()

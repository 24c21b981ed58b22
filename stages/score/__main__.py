"""Score stage: teacher log-prob of every sampled token, plus the rule reward -> scored shards.

    python -m stages.score --run runs/tiny --iter 3

Reads iter=i/rollouts/, runs the teacher over prompt + response (LM head and log-softmax applied in
chunks), grades each response, and writes iter=i/scored/ with the rollout columns kept as they are.
"""
from __future__ import annotations

import time

import pyarrow as pa
import torch

from common import shards
from common.config import ConfigError
from common.modeling import (load_inference_model, load_tokenizer, local_model_dir, peak_gpu_gib, policy_version,
                             response_logprobs)
from common.progress import Progress, stage_summary
from common.run import fail, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.score.mechanism import mechanism_metrics
from stages.score.verifier import grade_batch

SHARD_ROWS = 1024


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares log-probs of the same token ids: the vocabularies must be identical."""
    if len(student_tokenizer) != len(teacher_tokenizer):
        raise ConfigError(f"model.teacher: vocabulary size {len(teacher_tokenizer)} != student's {len(student_tokenizer)}")
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if teacher_vocab.get(token) != index:
            raise ConfigError(f"model.teacher: token {token!r} has id {teacher_vocab.get(token)} in the teacher, "
                              f"{index} in the student")


@torch.no_grad()
def teacher_logprobs(teacher, columns: dict, pad_id: int, batch_size: int, chunk_tokens: int,
                     topk: int = 0, packed: bool = False) -> dict[str, list]:
    """Teacher log-probs of every sampled token (+ top-k columns when asked), in row order.

    Returns {"teacher_logprobs": [...]} and, when the rollouts carry the student's top-k, the
    teacher's log-probs at those ids; with `topk`, the teacher's own top-k ids and log-probs.
    """
    prompts, responses = columns["prompt_ids"], columns["response_ids"]
    student_topk = columns.get("student_topk_ids")
    # Sorting by length keeps micro-batches homogeneous; results go back to row order.
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]) + len(responses[k]))
    result: dict[str, list] = {"teacher_logprobs": [None] * len(prompts)}
    if student_topk is not None:
        result["teacher_student_topk_logprobs"] = [None] * len(prompts)
    if topk:
        result["teacher_topk_ids"], result["teacher_topk_logprobs"] = [None] * len(prompts), [None] * len(prompts)
    with Progress(len(order), "score") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out = response_logprobs(teacher, [prompts[k] for k in batch], [responses[k] for k in batch], pad_id,
                                    chunk_tokens, packed, at_ids=None if student_topk is None else
                                    [student_topk[k] for k in batch], topk=topk)
            for position, k in enumerate(batch):
                result["teacher_logprobs"][k] = out.sampled[position].tolist()
                if student_topk is not None:
                    result["teacher_student_topk_logprobs"][k] = out.at_ids[position].tolist()
                if topk:
                    result["teacher_topk_ids"][k] = out.topk_ids[position].tolist()
                    result["teacher_topk_logprobs"][k] = out.topk_logprobs[position].tolist()
            bar.update(len(batch), sum(len(prompts[k]) + len(responses[k]) for k in batch))
    return result


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    try:
        config = load_run_config(args.run)
        out_dir = shards.stage_dir(args.run, args.iteration, "scored")
        if shards.stage_finished(out_dir):
            return
        rollouts = shards.read_stage(shards.stage_dir(args.run, args.iteration, "rollouts"), "rollouts")
        set_threads(config)
        shards.reset_stage(out_dir)
        started = time.time()
        teacher_dir = local_model_dir(config.model.teacher)
        teacher_tokenizer = load_tokenizer(teacher_dir)
        check_same_vocabulary(load_tokenizer(shards.checkpoint_dir(args.run, args.iteration)), teacher_tokenizer)
        teacher = load_inference_model(teacher_dir)
        teacher_version = policy_version(teacher_dir)
    except (ConfigError, shards.ContractError) as error:
        fail(str(error))
    columns = rollouts.to_pydict()
    forward_started = time.time()
    teacher_columns = teacher_logprobs(teacher, columns, teacher_tokenizer.pad_token_id, config.score.batch_size,
                                       config.score.logit_chunk_tokens, config.score.teacher_topk,
                                       config.score.packing)
    scores = teacher_columns["teacher_logprobs"]
    forward_seconds = time.time() - forward_started
    sc = config.score
    grades = grade_batch(list(zip(columns["response_text"], columns["ground_truth"])), sc.reward_mode,
                         sc.verifier_workers, sc.verifier_timeout_s)
    scored = rollouts
    for name, values in teacher_columns.items():
        scored = scored.append_column(name, pa.array(values))  # `conform` casts to the contract's types
    scored = scored.append_column("teacher_version", pa.array([teacher_version] * len(grades)))
    scored = scored.append_column("reward", pa.array([g.reward for g in grades], pa.float32()))
    scored = scored.append_column("correct", pa.array([g.correct for g in grades]))
    scored = scored.append_column("extracted_answer", pa.array([g.extracted_answer for g in grades], pa.string()))
    scored = scored.append_column("verifier_status", pa.array([g.status for g in grades]))
    for index, start in enumerate(range(0, max(scored.num_rows, 1), SHARD_ROWS)):
        shards.write_shard(shards.conform(scored.slice(start, SHARD_ROWS), "scored"), out_dir, index)

    tokens = sum(len(s) for s in scores)
    reverse_kl = sum(r - t for rl, sl in zip(columns["rollout_logprobs"], scores) for r, t in zip(rl, sl))
    metrics = {
        "score/tokens_per_s": (tokens + sum(map(len, columns["prompt_ids"]))) / max(forward_seconds, 1e-9),
        "rollout/reverse_kl": reverse_kl / max(tokens, 1),
        "rollout/reward_mean": sum(g.reward for g in grades) / len(grades),
        "rollout/accuracy": sum(g.correct for g in grades) / len(grades),
        "rollout/boxed_fraction": sum(g.status != "no_answer" for g in grades) / len(grades),
        "rollout/teacher_logprob_mean": sum(map(sum, scores)) / max(tokens, 1),
        "score/peak_gpu_gib": peak_gpu_gib(),
        **mechanism_metrics({**columns, **teacher_columns}),
    }
    manifest = shards.write_manifest(out_dir, "scored", args.iteration, config.hash(), started, metrics,
                                     {"teacher_version": teacher_version})
    forward_tokens = tokens + sum(map(len, columns["prompt_ids"]))  # what the teacher ran over
    stage_summary("score", args.iteration, manifest["rows"], forward_tokens, metrics["score/tokens_per_s"],
                  manifest["seconds"],
                  f"accuracy {metrics['rollout/accuracy']:.3f}, reverse KL {metrics['rollout/reverse_kl']:.4f}")


if __name__ == "__main__":
    main()

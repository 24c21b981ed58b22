"""The teacher behind one interface: `open_scorer(config, teacher_dir)` -> `.score(columns)`.

Both scorers return, for rows of prompt_ids + response_ids, the teacher's log-prob of every sampled
response token (`teacher_logprobs`), and optionally the teacher's own top-k. The HF scorer can also
return the teacher's log-probs at the student's top-k ids; vLLM cannot be asked for arbitrary ids,
so that combination is refused at config load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from common.batching import micro_batches
from common.config import Config, ConfigError, model_len
from common.hub import local_model_dir
from common.modeling import load_inference_model, load_tokenizer, response_logprobs
from common.progress import Progress
from common.vllm import close_llm, open_llm, prompt_logprobs


class TeacherScorer(Protocol):
    name: str

    def score(self, columns: dict) -> dict[str, list]:
        """{"teacher_logprobs": [...], + top-k columns} in row order for `columns` (pydict of rollouts)."""

    def close(self) -> None: ...


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares log-probs of the same token ids: the vocabularies must be identical."""
    if len(student_tokenizer) != len(teacher_tokenizer):
        raise ConfigError(f"model.teacher: vocabulary size {len(teacher_tokenizer)} != student's {len(student_tokenizer)}")
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    for token, index in sorted(student_vocab.items(), key=lambda item: item[1]):
        if teacher_vocab.get(token) != index:
            raise ConfigError(f"model.teacher: token {token!r} has id {teacher_vocab.get(token)} in the teacher, "
                              f"{index} in the student")


def open_scorer(config: Config, teacher_dir: Path) -> TeacherScorer:
    """The scorer `score.engine` names, holding the teacher in `teacher_dir`, after checking its
    vocabulary against the student's (every checkpoint carries the student's tokenizer: v0000 is its
    copy and the trainer exports the tokenizer it loaded from v_i)."""
    check_same_vocabulary(load_tokenizer(local_model_dir(config.model.student)), load_tokenizer(teacher_dir))
    if config.score.engine == "vllm":
        return VllmScorer(teacher_dir, config)
    return HfScorer(teacher_dir, config)


class HfScorer:
    """Chunked LM head and log-softmax, so peak memory does not grow with vocab x tokens."""
    name = "hf"

    def __init__(self, teacher_dir: Path, config: Config):
        self.model, self.pad_id = load_inference_model(teacher_dir), load_tokenizer(teacher_dir).pad_token_id
        s = config.score
        self.batch_size, self.chunk_tokens, self.topk, self.packed = (s.batch_size, s.logit_chunk_tokens,
                                                                      s.teacher_topk, s.packing)
        self.max_tokens = s.max_tokens_per_batch

    @torch.no_grad()
    def score(self, columns: dict) -> dict[str, list]:
        prompts, responses = columns["prompt_ids"], columns["response_ids"]
        student_topk = columns.get("student_topk_ids")
        # Batches by tokens (and at most batch_size rows), rows sorted by length so a padded batch pads
        # little; results go back to row order.
        tokens = [len(p) + len(r) for p, r in zip(prompts, responses)]
        batches = micro_batches(list(range(len(prompts))), tokens, self.max_tokens, self.batch_size)
        result: dict[str, list] = {"teacher_logprobs": [None] * len(prompts)}
        if student_topk is not None:
            result["teacher_student_topk_logprobs"] = [None] * len(prompts)
        if self.topk:
            result["teacher_topk_ids"], result["teacher_topk_logprobs"] = [None] * len(prompts), [None] * len(prompts)
        with Progress(len(prompts), "score") as bar:
            for batch in batches:
                out = response_logprobs(self.model, [prompts[k] for k in batch], [responses[k] for k in batch],
                                        self.pad_id, self.chunk_tokens, self.packed,
                                        at_ids=None if student_topk is None else [student_topk[k] for k in batch],
                                        topk=self.topk)
                for position, k in enumerate(batch):
                    result["teacher_logprobs"][k] = out.sampled[position].tolist()
                    if student_topk is not None:
                        result["teacher_student_topk_logprobs"][k] = out.at_ids[position].tolist()
                    if self.topk:
                        result["teacher_topk_ids"][k] = out.topk_ids[position].tolist()
                        result["teacher_topk_logprobs"][k] = out.topk_logprobs[position].tolist()
                bar.update(len(batch), sum(len(prompts[k]) + len(responses[k]) for k in batch))
        return result

    def close(self) -> None:
        self.model = None


class VllmScorer:
    """vLLM's prompt log-probs over prompt + response (`prompt_logprobs`), generating one dummy token.

    Prefix caching is off: cached blocks would skip the positions whose log-probs we ask for.
    """
    name = "vllm"

    def __init__(self, teacher_dir: Path, config: Config):
        s = config.score
        self.topk = s.teacher_topk
        self.llm = open_llm(teacher_dir, model_len(config, "score"), s.gpu_memory_utilization, s.enforce_eager,
                            config.seed, self.topk, prefix_caching=False)

    def score(self, columns: dict) -> dict[str, list]:
        out = prompt_logprobs(self.llm, columns["prompt_ids"], columns["response_ids"], self.topk)
        result = {"teacher_logprobs": out["logprobs"]}
        if self.topk:
            result["teacher_topk_ids"], result["teacher_topk_logprobs"] = out["topk_ids"], out["topk_logprobs"]
        return result

    def close(self) -> None:
        if self.llm is not None:
            close_llm(self.llm)
            self.llm = None

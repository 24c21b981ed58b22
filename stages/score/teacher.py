"""The teacher behind one interface: `open_scorer(config, teacher)` -> `.score(columns)`.

Every scorer returns, for rows of prompt_ids + response_ids, the teacher's log-prob of every sampled
response token (`teacher_logprobs`), and optionally the teacher's own top-k. The HF scorer runs the
teacher in this process and can also return its log-probs at the student's top-k ids; vLLM (in this
process) and a served teacher (`score.engine: server`: an OpenAI-compatible endpoint such as `vllm
serve`, on other machines) cannot be asked for arbitrary ids, so that combination is refused at
config load.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import torch

from common.batching import micro_batches
from common.config import Config, model_len
from common.errors import ConfigError
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


def open_scorer(config: Config, teacher: str | Path) -> TeacherScorer:
    """The scorer `score.engine` names, holding `teacher` (a model folder or hub id; for a served
    teacher the name it is served under), after checking its vocabulary against the student's (every
    checkpoint carries the student's tokenizer: v0000 is its copy and the trainer exports the
    tokenizer it loaded from v_i)."""
    student_tokenizer = load_tokenizer(local_model_dir(config.model.student))
    if config.score.engine == "server":
        return ServedScorer(str(teacher), config, student_tokenizer)
    teacher_dir = local_model_dir(teacher)
    check_same_vocabulary(student_tokenizer, load_tokenizer(teacher_dir))
    if config.score.engine == "vllm":
        return VllmScorer(teacher_dir, config)
    return HfScorer(teacher_dir, config)


class Teachers:
    """The scorers of a run's teachers, each opened on first use and kept: `teachers(model)` is the
    scorer holding `model` (what score_shard calls per routed teacher); `close()` frees them all."""

    def __init__(self, config: Config):
        self.config, self.scorers = config, {}

    def __call__(self, model: str) -> TeacherScorer:
        if model not in self.scorers:
            self.scorers[model] = open_scorer(self.config, model)
        return self.scorers[model]

    def close(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()
        self.scorers = {}


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


class ServedScorer:
    """The teacher on other machines, behind an OpenAI-compatible completions endpoint (`vllm serve`):
    prompt + response as token ids, one generated token, the prompt's log-probs (`prompt_logprobs`,
    vLLM's extension) read back at the response positions.

    Requests carry whole rows, batched by tokens (score.max_tokens_per_batch, score.batch_size); a
    failed or timed-out request is retried score.retries times with exponential backoff. At open it
    checks, each in one line, that the server answers, serves `model`, and tokenizes as the student
    does (the same ids for a probe of text, digits and the chat template's special tokens)."""
    name = "server"

    def __init__(self, model: str, config: Config, student_tokenizer):
        s = config.score
        self.url, self.model, self.topk = s.url.rstrip("/"), model, s.teacher_topk
        self.timeout, self.retries = s.request_timeout_s, s.retries
        self.max_tokens, self.batch_size = s.max_tokens_per_batch, s.batch_size
        served = [entry["id"] for entry in self._call("GET", "/models").get("data", [])]
        if model not in served:
            raise ConfigError(f"config key 'score.url': {self.url} serves {served}, not the teacher {model!r} "
                              f"(fix: serve it there, e.g. `vllm serve {model}`, or name the served model in "
                              "model.teacher / score.teachers)")
        probe = "What is 77 + 37? \\boxed{114} " + " ".join(student_tokenizer.all_special_tokens)
        ours = student_tokenizer(probe, add_special_tokens=False)["input_ids"]
        theirs = self._call("POST", "/tokenize", {"model": model, "prompt": probe, "add_special_tokens": False},
                            root=True).get("tokens")
        if theirs != ours:
            raise ConfigError(f"config key 'score.url': the served teacher {model!r} tokenizes a probe into other ids "
                              f"than the student's tokenizer ({(theirs or [])[:8]} against {ours[:8]}): their "
                              "vocabularies differ and distillation compares the same ids (fix: serve a teacher of "
                              "the student's vocabulary)")

    def _call(self, method: str, path: str, body: dict | None = None, root: bool = False) -> dict:
        """One request with retries; the server's answer as JSON. `root`: the path is off the /v1 prefix."""
        base = self.url.removesuffix("/v1") if root else self.url
        request = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json"},
                                         data=None if body is None else json.dumps(body).encode())
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == self.retries:
                    detail = error.read().decode(errors="replace")[:200]
                    raise ConfigError(f"config key 'score.url': {base + path} answered {error.code}: {detail} "
                                      "(fix: check the server's log)") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise ConfigError(f"config key 'score.url': no teacher server answers at {base + path} "
                                      f"({getattr(error, 'reason', error)}) after {self.retries + 1} attempts (fix: "
                                      "start it, e.g. `vllm serve <teacher> --port 8000`, and check the URL)") from None
            time.sleep(min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def score(self, columns: dict) -> dict[str, list]:
        prompts, responses = columns["prompt_ids"], columns["response_ids"]
        tokens = [len(p) + len(r) for p, r in zip(prompts, responses)]
        result: dict[str, list] = {"teacher_logprobs": [None] * len(prompts)}
        if self.topk:
            result["teacher_topk_ids"], result["teacher_topk_logprobs"] = [None] * len(prompts), [None] * len(prompts)
        with Progress(len(prompts), "score (served)") as bar:
            for batch in micro_batches(list(range(len(prompts))), tokens, self.max_tokens, self.batch_size):
                answer = self._call("POST", "/completions", {
                    "model": self.model, "prompt": [prompts[k] + responses[k] for k in batch], "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": self.topk})
                for choice in answer["choices"]:
                    k = batch[choice["index"]]
                    steps = choice["prompt_logprobs"][len(prompts[k]):] if responses[k] else []
                    result["teacher_logprobs"][k] = [step[str(token)]["logprob"]
                                                     for step, token in zip(steps, responses[k])]
                    if self.topk:
                        ranked = [sorted((entry["rank"], int(token), entry["logprob"]) for token, entry in step.items()
                                         if entry["rank"] <= self.topk) for step in steps]
                        result["teacher_topk_ids"][k] = [[t for _, t, _ in step] for step in ranked]
                        result["teacher_topk_logprobs"][k] = [[v for _, _, v in step] for step in ranked]
                bar.update(len(batch), sum(tokens[k] for k in batch))
        return result

    def close(self) -> None:
        """Nothing held here: the server is someone else's."""

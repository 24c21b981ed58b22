"""Model-side helpers shared by every stage: loading, prompt rendering, policy versions, and the
chunked log-prob gather that never materialises a [tokens x vocab] tensor at once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.attention import attention_implementation, packed_forward_kwargs
from common.devices import check_torch_sees_the_gpus


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"  # generation pads on the left; training builds its own batches
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model in `dtype` on the CPU, in eval mode (the trainer hands it to DeepSpeed), with the
    attention that packed rows need (common/attention.py)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,  # never pickles
                                                 attn_implementation=attention_implementation())
    model.eval()
    return model


def load_inference_model(path: str | Path) -> torch.nn.Module:
    """For sampling and scoring: bf16 on this process's GPU when it has one (a resident worker sees
    only its own: common/devices.py), fp32 on the CPU otherwise. A GPU that torch cannot use stops
    with one line instead of a silent fp32 run on the CPU."""
    check_torch_sees_the_gpus()
    if not torch.cuda.is_available():
        return load_model(path)
    return load_model(path, torch.bfloat16).to("cuda")


def load_weights_in_place(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Copy a checkpoint's safetensors weights into `model` (same architecture) without rebuilding it.

    Tied weights (lm_head = embed_tokens) are absent from the file and stay tied; any other missing
    or unexpected name is an error, so a checkpoint of another shape cannot half-load.
    """
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no *.safetensors weights")
    state = {name: tensor for f in files for name, tensor in load_file(str(f)).items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"{checkpoint} does not fit the loaded model (missing: {result.missing_keys[:3]}, "
                         f"unexpected: {result.unexpected_keys[:3]})")


@dataclass
class ResponseLogprobs:
    """Per-row log-probs over the response positions (one tensor per row, row order kept)."""
    sampled: list[torch.Tensor]                 # [len_r]: log p(sampled token)
    at_ids: list[torch.Tensor] | None = None    # [len_r, k]: log p at caller-given ids (e.g. the student's top-k)
    topk_ids: list[torch.Tensor] | None = None  # [len_r, k]: this model's own top-k ids
    topk_logprobs: list[torch.Tensor] | None = None


def _logprobs_at(logits: torch.Tensor, targets: torch.Tensor, at_ids: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(log p at targets, log p at at_ids, log of the normaliser) of fp32 logits [rows, vocab]."""
    normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
    sampled = (logits.gather(-1, targets[:, None]) - normaliser).squeeze(-1)
    return sampled, None if at_ids is None else logits.gather(-1, at_ids) - normaliser, normaliser


def _chunk_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    at_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(lm_head(hidden)) at `targets` and `at_ids`, for one chunk of rows, in fp32."""
    sampled, at, _ = _logprobs_at(lm_head(hidden).float(), targets, at_ids)
    return sampled, at


def gather_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_tokens: int = 4096,
    at_ids: torch.Tensor | None = None,
    topk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """log softmax(lm_head(hidden)) at `targets` (and at `at_ids`, and its top-k), chunk by chunk.

    hidden: [T, H] (already flattened), targets: [T], at_ids: [T, k]. The log-softmax runs in fp32
    per chunk, so at most chunk_tokens x vocab logits exist at once, whatever T is. With gradients,
    each chunk is checkpointed: autograd keeps only the chunk's hidden rows and recomputes its
    logits in backward, one chunk at a time (otherwise it would keep every chunk's fp32 logits for
    the backward: 4.3 GB for a 7k-token micro-batch at Qwen3's 151,936-token vocabulary).
    Returns (sampled [T], at_ids [T, k] | None, topk ids [T, topk] | None, topk log-probs | None).
    """
    # Top-k ids are for scoring (no gradient): that path keeps its logits for the top-k.
    track = torch.is_grad_enabled() and hidden.requires_grad and not topk
    sampled, at, top_ids, top_values = [], [], [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        chunk_ids = None if at_ids is None else at_ids[piece]
        if track:
            values, at_values = checkpoint(_chunk_logprobs, lm_head, hidden[piece], targets[piece], chunk_ids,
                                           use_reentrant=False)
        elif topk:
            logits = lm_head(hidden[piece]).float()
            values, at_values, normaliser = _logprobs_at(logits, targets[piece], chunk_ids)
            best, ids = logits.detach().topk(topk, dim=-1)
            top_ids.append(ids)
            top_values.append(best - normaliser.detach())
        else:
            values, at_values = _chunk_logprobs(lm_head, hidden[piece], targets[piece], chunk_ids)
        sampled.append(values)
        if at_values is not None:
            at.append(at_values)
    if not sampled:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, None if at_ids is None else empty.reshape(0, at_ids.shape[-1]), None, None
    return (torch.cat(sampled), torch.cat(at) if at else None,
            torch.cat(top_ids) if top_ids else None, torch.cat(top_values) if top_values else None)


def _packed_inputs(prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row holding every sequence back to back; position ids restart at 0 for each sequence (RoPE).
    The forward passes the boundaries to a varlen attention (common/attention.py), so no token
    attends across sequences, no compute is spent on padding and no mask is built."""
    ids, positions = [], []
    for prompt, response in zip(prompts, responses):
        ids += prompt + response
        positions += range(len(prompt) + len(response))
    return torch.tensor([ids]), torch.tensor([positions])


def _stacked_ids(at_ids: list, responses: list[list[int]]) -> torch.Tensor:
    """[T, k] long: each row's [len_r, k] ids (nested lists or tensors) stacked in row order."""
    rows = [torch.as_tensor(ids, dtype=torch.long) for ids in at_ids]
    if not rows:
        return torch.zeros((0, 0), dtype=torch.long)
    k = next((row.shape[-1] for row in rows if row.dim() == 2), 0)
    return torch.cat([row.reshape(len(response), k) for row, response in zip(rows, responses)])


def response_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    chunk_tokens: int = 4096,
    packed: bool = True,
    at_ids: list[list[list[int]]] | list[torch.Tensor] | None = None,
    topk: int = 0,
) -> ResponseLogprobs:
    """Log-prob of every response token given prompt + earlier response tokens, one tensor per row.

    `packed` concatenates the rows into one sequence (no padding); otherwise rows are right-padded
    into a batch. Only response positions go through the LM head. Gradients flow when called
    outside `torch.no_grad()`. `at_ids[r][k]` lists ids whose log-probs are wanted at response
    position k of row r; `topk` also returns the model's own top-k at each position.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    if packed:
        input_ids, position_ids = _packed_inputs(prompts, responses)
        offsets = [sum(lengths[:row]) for row in range(len(lengths))]
        forward = dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                       **packed_forward_kwargs(model, lengths, device))
        flat_ids = input_ids[0]
    else:
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            input_ids[row, : lengths[row]] = torch.tensor(prompt + response)
            attention_mask[row, : lengths[row]] = 1
        offsets = [row * width for row in range(len(lengths))]
        forward = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        flat_ids = input_ids.reshape(-1)
    # use_cache=False: a scoring or training forward keeps no KV cache.
    hidden = model.model(**forward, use_cache=False).last_hidden_state.reshape(-1, model.config.hidden_size)
    # Position j predicts token j+1: response token k of row r sits at offset+len(prompt)+k and is
    # predicted from the position before it.
    positions = torch.tensor([offset + len(prompt) - 1 + k for offset, prompt, response in
                              zip(offsets, prompts, responses) for k in range(len(response))], dtype=torch.long)
    targets = flat_ids[positions + 1]
    extra = None
    if at_ids is not None:
        extra = _stacked_ids(at_ids, responses).to(device)
    sampled, at, top_ids, top_values = gather_logprobs(hidden[positions.to(device)], model.lm_head,
                                                       targets.to(device), chunk_tokens, extra, topk)
    sizes = [len(r) for r in responses]

    def split(values: torch.Tensor | None) -> list[torch.Tensor] | None:
        return None if values is None else list(values.split(sizes))

    return ResponseLogprobs(split(sampled), split(at), split(top_ids), split(top_values))

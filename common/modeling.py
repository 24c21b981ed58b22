"""Model-side helpers shared by every stage: loading, prompt rendering, policy versions, and the
chunked log-prob gather that never materialises a [tokens x vocab] tensor at once."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"  # generation pads on the left; training builds its own batches
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], enable_thinking: bool) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant generation prompt."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(checkpoint_dir: str | Path) -> str:
    return file_sha256(Path(checkpoint_dir) / "model.safetensors")


def policy_version(checkpoint_dir: str | Path) -> str:
    """`<checkpoint name>-<first 12 hex of the weights' sha256>`: an id plus a content hash.

    A finished pipeline checkpoint records the hash in its DONE marker, so it is not recomputed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    done = checkpoint_dir / "DONE"
    digest = done.read_text().strip() if done.exists() else weights_sha256(checkpoint_dir)
    return f"{checkpoint_dir.name}-{digest[:12]}"


def gather_logprobs(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target] for each position, `chunk_tokens` rows at a time.

    hidden: [T, H] (already flattened), targets: [T]. The log-softmax runs in fp32 per chunk so the
    peak extra memory is chunk_tokens x vocab floats, whatever T is.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = lm_head(hidden[start : start + chunk_tokens]).float()
        chosen = targets[start : start + chunk_tokens]
        pieces.append(logits.gather(-1, chosen[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    chunk_tokens: int = 4096,
) -> list[torch.Tensor]:
    """Log-prob of every response token given prompt + earlier response tokens, one tensor per row.

    Rows are right-padded into one batch; only the response positions go through the LM head.
    Gradients flow when called outside `torch.no_grad()`.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, : lengths[row]] = torch.tensor(prompt + response)
        attention_mask[row, : lengths[row]] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # Position j predicts token j+1: response token k of row r sits at len(prompt)+k and is
    # predicted from position len(prompt)+k-1.
    rows, cols = [], []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        rows += [row] * len(response)
        cols += range(len(prompt) - 1, len(prompt) - 1 + len(response))
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    flat = gather_logprobs(hidden[rows_t, cols_t], model.lm_head, input_ids[rows_t, cols_t + 1], chunk_tokens)
    return list(flat.split([len(r) for r in responses]))

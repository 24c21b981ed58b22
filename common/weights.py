"""Exact checksums of a policy's weights: what an engine loaded against what the trainer exported.

The weight-sync gate's probe compares log-probs within a tolerance, and one optimizer step at the
card's lr of 1e-6 can move them less than that (in bf16 a weight of 0.02 changes only when the step
crosses its rounding quantum of ~1e-4). A checksum of the weights' bits cannot be fooled that way:
each tensor's elements, read as integers, weighted by a function of their position and summed in
wrapping int64 arithmetic. Integer sums are exact in any order, so a GPU and a CPU get the same
number for the same bits, and any changed element changes it (two changes cancel with a chance of
about 2^-64).

`bit_sum` (no position weights) is the same number however the tensors are split or fused, which is
what a vLLM engine can be asked for: it fuses q/k/v and gate/up into single tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

CHUNK = 1 << 24  # elements at a time: the position weights of a 311M-element embedding would be 2.5 GB


def _as_integers(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits, as one integer per 2 or 4 bytes."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    kind = torch.int32 if flat.numel() % 4 == 0 else torch.int16
    return flat.view(kind)


def checksum(tensor: torch.Tensor) -> int:
    """sum_i bits_i * (2654435761 * i + 1) mod 2^64, as a signed int64: order-free and exact."""
    bits = _as_integers(tensor)
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), CHUNK):
        piece = bits[start : start + CHUNK].to(torch.int64)
        index = torch.arange(start, start + piece.numel(), dtype=torch.int64, device=bits.device)
        total += (piece * (index * 2654435761 + 1)).sum()
    return int(total)


def bit_sum(tensors: Iterable[torch.Tensor]) -> int:
    """sum of every tensor's bits (int64, wrapping): invariant to how the tensors are split or fused."""
    total = 0
    for tensor in tensors:
        total += int(_as_integers(tensor).to(torch.int64).sum())
    return (total + 2**63) % 2**64 - 2**63


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of an HF model as its safetensors file holds them (a tied LM head is not saved)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def file_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: tensor for f in sorted(Path(checkpoint).glob("*.safetensors")) for name, tensor in
            load_file(str(f)).items()}


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: checksum(tensor) for name, tensor in sorted(tensors.items())}

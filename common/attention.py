"""Attention for packed rows, chosen in one place: sequences back to back in one row must not cost a
dense (sum of lengths)^2 mask.

Train and score forwards may pack their rows (`train.packing`, `score.packing`): one row holding
every sequence, position ids restarting at 0 for each. Given no mask, transformers builds a dense
block-diagonal mask for sdpa: 5.16 GiB above the process's baseline for 8 rows of ~4k tokens on a
width-128 model, against 0.28 GiB padded (measured here, 2026-12-05). A varlen kernel takes the
sequence boundaries instead (`cu_seq_lens`, the cumulative lengths, as flash-attention names them):

- `flash_attention_2` when a CUDA device and the `flash_attn` package are there (transformers
  runs its varlen kernel from `cu_seq_lens_q/k`);
- otherwise `opd_varlen`, registered here: each sequence of the packed row through torch's
  `scaled_dot_product_attention` with `is_causal=True` (its flash / memory-efficient kernels on a GPU,
  the flash kernel on a CPU), so no mask exists and memory grows with the longest sequence, not with
  the row. Without boundaries (a padded batch, generation) it is transformers' own sdpa, mask and all.

`packed_forward_kwargs` gives what a packed forward passes the model: the boundaries, and a mask
mapping of None per layer type, which tells transformers the masks are prepared (none needed).
"""
from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN = "opd_varlen"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """[batch, heads, tokens, dim] in, [batch, tokens, heads, dim] out, as transformers' interface wants.
    With `cu_seq_lens_q` (a packed row): causal attention within each sequence, one sequence at a time."""
    boundaries = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if boundaries is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    edges = boundaries.tolist()
    pieces = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                     None, dropout=dropout, scaling=scaling, is_causal=True)[0]
              for start, end in zip(edges[:-1], edges[1:])]
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(VARLEN, varlen_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)  # padded batches get exactly sdpa's mask


def attention_implementation() -> str:
    """The attention every model of the pipeline loads with: flash-attention's varlen kernel where it
    can run, else the per-sequence sdpa above (identical to sdpa on padded batches)."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN


def packed_forward_kwargs(model: torch.nn.Module, lengths: list[int], device: torch.device) -> dict:
    """What a forward over one packed row of sequences of `lengths` passes the model, besides its ids and
    position ids: the sequence boundaries, and no mask (one None per layer type: prepared, not needed).
    A model loaded with another attention would ignore the boundaries and attend across sequences."""
    if model.config._attn_implementation not in (VARLEN, "flash_attention_2"):
        raise ValueError(f"a packed forward needs an attention that takes sequence boundaries; this model runs "
                         f"'{model.config._attn_implementation}' (load it with common.modeling.load_model)")
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    longest = max(lengths, default=0)
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    return {"attention_mask": {layer_type: None for layer_type in layer_types}, "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries, "max_length_q": longest, "max_length_k": longest}

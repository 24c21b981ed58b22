"""Model FLOPs utilisation (nanoGPT's `mfu`, PaLM's appendix B): the FLOPs a forward (and backward)
of the sampled rows needs, over what the devices could do in the time it took.

A forward of one sequence of S tokens costs 2 N S for the weight matmuls (N: the parameters that
multiply activations: every one but the input embedding, the output projection counted once even
when tied) plus 4 L d S^2 for attention's two S x S products (L layers, d = heads x head_dim, no
discount for the causal mask, as PaLM and nanoGPT count). Training is 3 forwards (the backward is
two); recomputations (lp_old, gradient checkpointing) are not counted, as MFU (not HFU) does.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from safetensors import safe_open


def matmul_parameters(model_dir: str | Path) -> int:
    """N of a saved model, from its safetensors headers (nothing loaded): every parameter but the input
    embedding, plus the output projection once when it is tied to it (no separate lm_head stored)."""
    total = embedding = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "numpy") as weights:  # reads the header only
            for name in weights.keys():
                count = math.prod(weights.get_slice(name).get_shape())
                total += count
                embedding += count if name.endswith("embed_tokens.weight") else 0
    tied = json.loads((Path(model_dir) / "config.json").read_text()).get("tie_word_embeddings", False)
    return total - embedding + (embedding if tied else 0)


@functools.lru_cache(maxsize=32)
def _shape(model_dir: str) -> tuple[int, int, int] | None:
    """(N, layers, attention width) of a saved model, read once per folder (a teacher is asked every
    shard); None where the folder has no weights (a served teacher)."""
    if not any(Path(model_dir).glob("*.safetensors")):
        return None
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    width = heads * (config.get("head_dim") or config["hidden_size"] // heads)
    return matmul_parameters(model_dir), config["num_hidden_layers"], width


def forward_flops(model_dir: str | Path, lengths: list[int]) -> float | None:
    """FLOPs of one forward of the saved model over sequences of these lengths (prompt + response each);
    None where the folder has no weights (a served teacher)."""
    shape = _shape(str(model_dir))
    if shape is None:
        return None
    n, layers, width = shape
    return float(sum(2 * n * s + 4 * layers * width * s * s for s in lengths))


def mfu(flops: float | None, seconds: float, devices: int, peak: float | None) -> float | None:
    """Achieved over available FLOPs; None without a known peak, FLOP count or measured time."""
    if flops is None or peak is None or seconds <= 0:
        return None
    return flops / (seconds * devices * peak)

"""Random-weight Qwen3 student and teacher at the real models' widths, few layers deep.

Every matrix of Qwen3-1.7B-Base (student) and Qwen3-4B-Base (teacher) has its real shape here:
hidden size, heads, head_dim, MLP width, the 151,936-row tied embedding, rope theta. Only the depth
is cut (2 layers by default), so the pipeline's memory and speed at the real vocabulary and widths can
be rehearsed on one machine without the weights, which cannot be downloaded here. The weights are
seeded: a rebuild writes the same safetensors. Each folder holds the Qwen3 tokenizer too, since the
pipeline loads tokenizer and model from one folder.

    python -m rehearsal.models --out assets/rehearsal [--layers 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from common.modeling import load_model, load_tokenizer
from rehearsal.tokenizer import EOS_TOKEN, PAD_TOKEN, BuildError, ensure_tokenizer

# Shared by both models: Qwen/Qwen3-1.7B-Base's and Qwen/Qwen3-4B-Base's config.json agree on these.
COMMON = dict(
    vocab_size=151_936,  # 151,669 tokens padded to a multiple of 128 rows
    head_dim=128,
    num_key_value_heads=8,
    hidden_act="silu",
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32_768,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
    use_sliding_window=False,
    sliding_window=None,
    bos_token_id=151_643,
    eos_token_id=151_643,  # the Base models' config; the pipeline stops at the tokenizer's EOS and pad
)


@dataclass(frozen=True)
class RealShape:
    name: str  # the hub model whose config this copies
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int  # the real depth; the rehearsal builds fewer


# Qwen/Qwen3-1.7B-Base config.json: hidden 2048, MLP 6144, 16 query heads, 28 layers (see the module's
# tests for where each figure was read). Qwen/Qwen3-4B-Base config.json: hidden 2560, MLP 9728, 32 query
# heads, 36 layers.
SHAPES = {
    "student": RealShape("Qwen/Qwen3-1.7B-Base", 2048, 6144, 16, 28),
    "teacher": RealShape("Qwen/Qwen3-4B-Base", 2560, 9728, 32, 36),
}


def model_config(shape: RealShape, layers: int) -> Qwen3Config:
    """The real config of `shape` with `layers` decoder layers instead of its full depth."""
    if layers < 1:
        raise BuildError(f"error: --layers {layers} builds no decoder layer (fix: pass --layers 1 or more)")
    # max_window_layers only matters with sliding windows (off in Qwen3); it equals the depth in the
    # real configs, so it follows the depth here.
    return Qwen3Config(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                       num_attention_heads=shape.num_attention_heads, num_hidden_layers=layers,
                       max_window_layers=layers, **COMMON)


def parameter_counts(config: Qwen3Config) -> dict[str, int]:
    """Parameters of a model of `config` (the tied LM head counted once), built on the meta device.

    The meta device allocates nothing, so the full-depth models' counts cost no memory: they are the
    check that the widths are the real ones (Qwen3-4B-Base's safetensors index gives its exact size).
    """
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def build_model(shape: RealShape, layers: int, seed: int) -> Qwen3ForCausalLM:
    """Seeded random weights in bf16, the real checkpoints' dtype (half the disk of fp32)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(model_config(shape, layers))  # initialised in fp32 on the CPU: reproducible
    return model.to(torch.bfloat16).eval()


def write_model(role: str, out: Path, tokenizer_dir: Path, layers: int, seed: int) -> Path:
    """`out/role`: config, generation config, model.safetensors and the Qwen3 tokenizer files."""
    folder = Path(out) / role
    staging = folder.with_name(f".{role}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(SHAPES[role], layers, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN))
    model.save_pretrained(staging, safe_serialization=True)
    del model
    for file in sorted(Path(tokenizer_dir).iterdir()):
        shutil.copy2(file, staging / file.name)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/rehearsal"), help="writes OUT/student and OUT/teacher")
    parser.add_argument("--tokenizer", type=Path, default=Path("assets/qwen3-tokenizer"),
                        help="Qwen3 tokenizer folder (built if absent)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of each model (real: 28 and 36)")
    parser.add_argument("--seed", type=int, default=0, help="student seed; the teacher uses seed + 1")
    args = parser.parse_args(argv)
    try:
        tokenizer_dir = ensure_tokenizer(args.tokenizer)
        for offset, role in enumerate(SHAPES):
            start = time.perf_counter()
            folder = write_model(role, args.out, tokenizer_dir, args.layers, args.seed + offset)
            loaded = load_model(folder, torch.bfloat16)  # the pipeline's own loader: proves the folder loads
            built = sum(p.numel() for p in loaded.parameters())
            del loaded
            shape = SHAPES[role]
            real = parameter_counts(model_config(shape, shape.num_hidden_layers))
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            print(f"{role}: {folder} ({shape.name} widths, {args.layers} of {shape.num_hidden_layers} layers) "
                  f"{built:,} parameters, {size / 2**20:,.0f} MiB bf16, {time.perf_counter() - start:.0f}s | "
                  f"at full depth {real['total']:,} ({real['non_embedding']:,} non-embedding)")
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

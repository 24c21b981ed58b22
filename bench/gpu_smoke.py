"""Smoke test of the card's recipe: one full iteration at the real model shapes, random weights.

    python bench/gpu_smoke.py [--shapes real|tiny] [--response-tokens 512] [--no-offload] [--out /tmp/opd-smoke]

Builds a randomly initialised Qwen3-1.7B-shaped student and Qwen3-4B-shaped teacher (bf16, vocab
151,936), runs `orchestrator iterate -n 1` with configs/qwen3-1.7b-opd-dapo.yaml (responses cut to
--response-tokens, the tiny world's prompts, no eval), and prints each stage's tokens/s, seconds
and peak GPU memory from the stage manifests. `--shapes tiny` runs the same on a CPU in a minute.

No Qwen3 tokenizer can be downloaded here, so the tiny world's tokenizer is padded with placeholder
tokens to the Qwen3 vocabulary size: every id a random model samples decodes to something.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import shards  # noqa: E402
from common.modeling import load_tokenizer  # noqa: E402

QWEN3_VOCAB = 151_936
SHAPES = {
    "real": {
        "student": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128),
        "teacher": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128),
    },
    "tiny": {
        "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16),
        "teacher": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=24),
    },
}


def build_models(out: Path, shapes: str) -> None:
    tokenizer = load_tokenizer(ROOT / "assets/tiny/student")
    vocab = QWEN3_VOCAB if shapes == "real" else len(tokenizer)
    if vocab > len(tokenizer):
        tokenizer.add_tokens([f"<|smoke_{i}|>" for i in range(vocab - len(tokenizer))], special_tokens=True)
    for seed, role in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=vocab, max_position_embeddings=8192, rope_theta=1e6, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **SHAPES[shapes][role])
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if shapes == "real" else torch.float32)
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        print(f"{role}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {out / role}", flush=True)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="real")
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--no-offload", action="store_true", help="ZeRO-1 without offload (skips the CPU Adam build)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/opd-smoke"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    build_models(args.out, args.shapes)
    overrides = [f"model.student={args.out / 'student'}", f"model.teacher={args.out / 'teacher'}",
                 "data.train=assets/tiny/data/train.parquet", f"generate.max_response_tokens={args.response_tokens}",
                 "generate.max_model_len=0", "eval.every=0"]
    if args.no_offload:
        overrides += ["train.zero_stage=1", "train.offload_params=false", "train.offload_optimizer=false"]
    run = args.out / "run"
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(run),
               "--config", "configs/qwen3-1.7b-opd-dapo.yaml", "-n", "1", *[a for o in overrides for a in ("-o", o)]]
    subprocess.run(command, cwd=ROOT, check=True)

    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "shapes": args.shapes, "response_tokens": args.response_tokens, "offload": not args.no_offload}
    for stage, key in (("rollouts", "generate"), ("scored", "score"), ("train", "train")):
        manifest = shards.read_manifest(shards.stage_dir(run, 0, stage))
        metrics = manifest["metrics"]
        results[key] = {"seconds": manifest["seconds"], "tokens_per_s": round(metrics[f"{key}/tokens_per_s"]),
                        "peak_gpu_gib": round(metrics[f"{key}/peak_gpu_gib"], 1)}
    results["response_tokens_sampled"] = shards.read_manifest(shards.stage_dir(run, 0, "rollouts"))["metrics"][
        "generate/response_tokens"]
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()

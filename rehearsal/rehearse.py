"""`make rehearse`: the card's recipe on this CPU at the real vocabulary and widths.

    python -m rehearsal.rehearse [--run runs/rehearse] [--iterations 1] [--small]

Runs configs/qwen3-1.7b-opd-dapo.yaml on Qwen3's real tokenizer, the real DAPO-Math-17k prompts
(boxed template, enable_thinking false) and random-weight models of Qwen3-1.7B-Base's and
Qwen3-4B-Base's real widths, heads, head_dim and 151,936-row tied vocabulary (`make rehearsal-models`),
overriding only what two CPU cores cannot hold (OVERRIDES, each with its reason). Every other card
setting stays: ZeRO-3 with parameter and optimizer offload, packing, gradient checkpointing,
8192-token micro-batches (two per mini-batch), k1 in policy-gradient form, the deepscaler
reward, PPO clip and dual clip, lr 1e-6. A CPU computes in fp32 whatever `train.bf16` says (this
machine's cores have no bf16 matrix units). Then `orchestrator check` must pass, and the last line gives
each stage's tokens/s and peak RSS (from the stage manifests).

`--small` is the slow suite's variant (tests/test_rehearsal.py): the same tokenizer, vocabulary and
widths, short iterations, ZeRO-1 without offload (CPU Adam's first compile takes minutes).

Both run in resident mode (the default): one Dask worker holds the engine, the teacher and the
trainer at real width (13 GB here), so the run also shows that Dask never pauses such a worker.
Per iteration it prints what the checkpoint cost: export, hashing, the optimizer state's write
(overlapping the next iteration's sampling) and the verifications.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import shards
from orchestrator.checks import check_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qwen3-1.7b-opd-dapo.yaml"
MODELS = ROOT / "assets" / "rehearsal"

# (override, why a CPU needs it). Nothing else of the card's config changes.
OVERRIDES = [
    (f"model.student={MODELS / 'student'}", "random weights at Qwen3-1.7B-Base's shape, 2 of its 28 layers"),
    (f"model.teacher={MODELS / 'teacher'}", "random weights at Qwen3-4B-Base's shape, 2 of its 36 layers"),
    ("generate.prompts_per_iteration=16", "one of the card's mini-batches (16 prompts x 4 responses, one "
                                          "optimizer step): its 64 prompts are hours of CPU sampling"),
    ("generate.max_response_tokens=160", "the card's 7168: a random-weight model never stops, so every "
                                         "response is full length; 160 makes ~250-token sequences and a "
                                         "mini-batch of ~16k tokens, 2 micro-batches of <= 8192"),
    ("eval.prompts=2", "the card evaluates all of AIME24/25, AMC23 and MATH-500 at avg@4"),
    ("eval.k=1", "as above"),
    ("eval.max_response_tokens=32", "as above"),
    ("generate.batch_size=64", "all 64 responses in one sampling batch"),
    ("train.logit_chunk_tokens=1024", "LM-head chunks of 1024 rows: 0.6 GB of fp32 logits each, not 2.5 GB"),
    ("score.logit_chunk_tokens=1024", "as above, for the teacher"),
    ("train.processes=1", "one training rank: the card's node has 4 GPUs, this machine 2 cores"),
    ("generate.engine=hf", "vLLM's CPU build at real width adds minutes of start-up on 2 cores; the HF engine "
                           "samples the same distribution"),
]
SMALL = [  # the default suite's variant: minutes, not an hour
    ("generate.prompts_per_iteration=2", "tiny"), ("train.mini_batch_prompts=2", "tiny"),
    ("generate.max_response_tokens=16", "tiny"), ("train.max_tokens_per_micro_batch=256", "2+ micro-batches"),
    ("train.zero_stage=1", "no CPU Adam compile"), ("train.offload_params=false", "as above"),
    ("train.offload_optimizer=false", "as above"), ("eval.every=0", "no eval"),
]


def overrides(small: bool) -> list[str]:
    chosen = dict(o.split("=", 1) for o, _ in OVERRIDES)
    if small:
        chosen.update(dict(o.split("=", 1) for o, _ in SMALL))
    return [f"{key}={value}" for key, value in chosen.items()]


def summary_lines(run: Path) -> list[str]:
    """Per finished iteration: each stage's tokens/s and peak RSS (its own, in either mode), then what
    the checkpoint cost: the policy's export and hashing, the optimizer state's write and hashing (in
    resident mode while the next iteration samples), and the verifications of the checkpoint read."""
    lines = []
    finished = sorted(int(p.parent.parent.name.split("=")[1]) for p in run.glob("iter=*/train/_MANIFEST.json"))
    for i in finished:
        g, s, t = (shards.read_manifest(shards.stage_dir(run, i, stage)).metrics
                   for stage in ("rollouts", "scored", "train"))
        lines.append(
            f"rehearse iter {i}: generate {g['generate/engine_tokens_per_s']:,.0f} tok/s "
            f"(peak RSS {g['generate/peak_rss_gib']:.1f} GiB) | score {s['score/teacher_tokens_per_s']:,.0f} tok/s "
            f"(peak RSS {s['score/peak_rss_gib']:.1f} GiB) | train {t['train/tokens_per_s']:,.0f} tok/s, "
            f"{t['train/micro_batches_per_step']:.0f} micro-batches per step (peak RSS {t['train/peak_rss_gib']:.1f} "
            f"GiB, {t['train/baseline_rss_gib']:.1f} GiB before the first step)")
        lines.append(
            f"checkpoint v{i + 1:04d}: export {t['train/export_seconds']:.1f} s, policy hash "
            f"{t['train/policy_hash_seconds']:.1f} s | optimizer state write {t['train/state_write_seconds']:.1f} s, "
            f"hash {t['train/state_hash_seconds']:.1f} s | verify v{i:04d}: trainer {t['train/verify_seconds']:.1f} s, "
            f"sampler {g.get('generate/verify_seconds', 0.0):.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.rehearse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "rehearse")
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="the default suite's variant (minutes)")
    args = parser.parse_args(argv)
    for override, why in OVERRIDES + (SMALL if args.small else []):
        print(f"override {override:<48} # {why}", flush=True)
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(args.run), "--config", str(CONFIG),
               "-n", str(args.iterations), *[a for o in overrides(args.small) for a in ("-o", o)]]
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        return 1
    finished, problems = check_run(args.run)
    for problem in problems:
        print(f"problem: {problem}", flush=True)
    print(f"orchestrator check: {finished} finished iteration(s), {len(problems)} problem(s)", flush=True)
    for line in summary_lines(args.run):
        print(line, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

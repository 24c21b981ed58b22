"""The card's longest rows on this CPU: score and train real-width models on ~7k-token responses.

    python -m rehearsal.long_rows [--run runs/rehearse-long] [--rows 2] [--response-tokens 7000]

No sampler here produces 7k-token responses in minutes, so this writes a synthetic rollout shard of
`--rows` rows (a 120-token prompt and `--response-tokens` random response tokens each, sampled as if
by v0) into a run of the card's config on the rehearsal's models (real widths, 2 layers, vocab
151,936), seals it, and runs the score and train stages on it as stage processes: the teacher's
packed forward with varlen attention, then ZeRO-3 with parameter and optimizer offload, gradient
checkpointing, packing and 8192-token micro-batches (one row each), k1. Prints each stage's seconds,
tokens/s and peak RSS from its manifest. A one-off measurement for docs/recipe.md (about 20 minutes
on 2 cores), not part of any test suite.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import torch

from common import shards
from common.config import load_config
from orchestrator.loop import prepare_run
from rehearsal.rehearse import CONFIG, MODELS, ROOT

OVERRIDES = [f"model.student={MODELS / 'student'}", f"model.teacher={MODELS / 'teacher'}", "train.processes=1",
             "generate.engine=hf", "train.logit_chunk_tokens=1024", "score.logit_chunk_tokens=1024",
             "orchestrator.mode=subprocess", "eval.every=0", "generate.n=1"]


def synthetic_rollouts(run: Path, rows: int, response_tokens: int) -> int:
    """A sealed iter=0/rollouts/ of `rows` random rows sampled 'by' v0: the contract's columns."""
    version = shards.policy_version(shards.checkpoint_dir(run, 0))
    g = torch.Generator().manual_seed(0)
    table = pa.Table.from_pylist([{
        "prompt_id": f"long-{k}", "sample_idx": 0, "iteration": 0, "policy_version": version,
        "data_source": "synthetic", "ground_truth": "0",
        "prompt_ids": torch.randint(10, 151_000, (120,), generator=g).tolist(),
        "response_ids": torch.randint(10, 151_000, (response_tokens,), generator=g).tolist(),
        "response_text": "", "rollout_logprobs": [-12.0] * response_tokens, "finish_reason": "length",
    } for k in range(rows)], schema=shards.ROLLOUT_SCHEMA)
    out = shards.stage_dir(run, 0, "rollouts")
    shards.reset_stage(out)
    shards.write_shard(table, out, 0)
    shards.write_manifest(out, "rollouts", 0, time.time(), {}, policy_version=version)
    return rows * (120 + response_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal.long_rows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "rehearse-long")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=7000)
    args = parser.parse_args(argv)
    shutil.rmtree(args.run, ignore_errors=True)
    overrides = OVERRIDES + [f"generate.prompts_per_iteration={args.rows}", f"train.mini_batch_prompts={args.rows}",
                             f"generate.max_response_tokens={args.response_tokens}", "generate.max_model_len=0"]
    prepare_run(args.run, load_config(CONFIG, overrides), force=False)
    tokens = synthetic_rollouts(args.run, args.rows, args.response_tokens)
    print(f"long rows: {args.rows} rows of 120 + {args.response_tokens:,} tokens ({tokens:,} in all) in {args.run}",
          flush=True)
    for stage, folder in (("score", "scored"), ("train", "train")):
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--run", str(args.run), "--iter", "0"], cwd=ROOT)
        if done.returncode != 0:
            return 1
        manifest = shards.read_manifest(shards.stage_dir(args.run, 0, folder))
        m = manifest.metrics
        key = "score/teacher_tokens_per_s" if stage == "score" else "train/tokens_per_s"
        extra = (f", {m['train/micro_batches_per_step']:.0f} micro-batches, {m['train/baseline_rss_gib']:.1f} GiB "
                 "before the first step" if stage == "train" else "")
        print(f"long rows {stage}: {manifest.seconds:.0f} s, {m[key]:,.0f} tok/s, peak RSS "
              f"{m[f'{stage}/peak_rss_gib']:.1f} GiB{extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

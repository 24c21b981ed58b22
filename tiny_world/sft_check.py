"""Room to learn: a separate supervised run from the student checkpoint (reported, not shipped).

    python -m tiny_world.sft_check --assets assets/tiny

Trains a copy of the student on the worked solutions with a different data order than the build,
then prints its sampled and greedy accuracy on the eval split. Reaching >= 0.8 shows the student's
architecture can represent the task, so what on-policy distillation leaves on the table is not a
capacity limit.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow.parquet as pq
import torch

from common.libraries import quiet_libraries
from common.modeling import load_model, load_tokenizer
from tiny_world.build import sft_batch, sft_examples
from tiny_world.evaluate import accuracy
from tiny_world.task import parse_question


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=Path("assets/tiny"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    quiet_libraries()
    tokenizer, model = load_tokenizer(args.assets / "student"), load_model(args.assets / "student")
    rows = pq.read_table(args.assets / "data" / "train.parquet").to_pylist()
    examples = sft_examples([parse_question(r["prompt"][0]["content"]) for r in rows], tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    rng = random.Random(args.seed)
    model.train()
    for _step in range(args.steps):
        input_ids, labels, mask = sft_batch(rng.sample(examples, 64), tokenizer.pad_token_id)
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    out = Path("runs/sft_check")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    eval_path = args.assets / "data" / "eval.parquet"
    sampled, greedy = accuracy(out, eval_path, 1.0)["accuracy"], accuracy(out, eval_path, 0.0)["accuracy"]
    print(f"sft-check steps={args.steps} lr={args.lr} sampled={sampled:.3f} greedy={greedy:.3f}")


if __name__ == "__main__":
    main()

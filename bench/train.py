"""Training-step benchmark: the train stage's step under DeepSpeed vs the same step in a plain torch loop.

    python -m bench.train [--steps 12] [--sequences 64]

Both sides run the very same micro-batching and loss code (stages/train) on the tiny student in
fp32 on CPU; only the engine differs: DeepSpeed (ZeRO-1, gloo, our config) against
`loss.backward()` + `clip_grad_norm_` + `torch.optim.AdamW.step()`. Reports the median seconds per
optimizer step (first two steps dropped as warm-up) and the ratio, and writes
bench/results/train.json for `make bench`'s summary (bench/summary.py).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from bench.record import write_results
from common.config import load_config
from common.modeling import load_model
from stages.train.engine import PolicyLogprobs, init_distributed, open_engine
from stages.train.iteration import IterationData, minibatch_backward
from stages.train.loss import LossConfig

STUDENT = "assets/tiny/student"


def tiny_world_batch(sequences: int, seed: int = 0) -> IterationData:
    """Shapes of a tiny-world mini-batch: ~60-token prompts, responses up to 64 tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 300) for _ in range(rng.randint(50, 70))] for _ in range(sequences)]
    responses = [[rng.randrange(10, 300) for _ in range(rng.randint(30, 64))] for _ in range(sequences)]
    data = IterationData(prompts, responses, teacher=[torch.rand(len(r)) * -3 for r in responses],
                         rollout=[torch.zeros(len(r)) for r in responses])
    data.old = [torch.rand(len(r)) * -3 for r in responses]
    return data


class PlainEngine:
    """A plain torch training loop with the interface `minibatch_backward` drives."""

    def __init__(self, model, lr: float, grad_clip: float):
        self.module = PolicyLogprobs(model)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr)
        self.grad_clip = grad_clip

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_steps(engine, data: IterationData, config, steps: int) -> list[float]:
    rows = list(range(len(data.prompts)))
    normaliser = sum(map(len, data.responses))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        minibatch_backward(engine, data, rows, normaliser, config.train, LossConfig(), 0, [0], "bench")
        engine.step()
        times.append(time.perf_counter() - began)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=64, help="sequences per optimizer step")
    args = parser.parse_args()
    config = load_config("configs/tiny.yaml")
    data = tiny_world_batch(args.sequences)
    init_distributed()
    results = {}
    # Alternate the two engines so machine noise hits both alike.
    for _round in range(2):
        for name in ("plain", "deepspeed"):
            torch.manual_seed(0)
            if name == "plain":
                model = load_model(STUDENT)
                model.train()
                engine = PlainEngine(model, config.train.lr, config.train.grad_clip)
            else:
                engine = open_engine(config, STUDENT)
            results.setdefault(name, []).extend(time_steps(engine, data, config, args.steps))
    plain, deepspeed = statistics.median(results["plain"]), statistics.median(results["deepspeed"])
    tokens = sum(len(p) + len(r) for p, r in zip(data.prompts, data.responses))
    summary = {"sequences_per_step": args.sequences, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
               "plain_median_s": round(plain, 4), "deepspeed_median_s": round(deepspeed, 4),
               "deepspeed_over_plain": round(deepspeed / plain, 3), "samples_per_engine": len(results["plain"])}
    print(json.dumps(summary))
    goal = 1.3  # DeepSpeed's step at most 1.3x the plain loop's (docs/training.md)
    write_results("train", "make bench-train", [
        {"metric": "plain torch loop, median s per optimizer step", "value": round(plain, 4), "unit": "s",
         "goal": "", "met": None},
        {"metric": "DeepSpeed (ZeRO-1), median s per optimizer step", "value": round(deepspeed, 4), "unit": "s",
         "goal": "", "met": None},
        {"metric": "DeepSpeed / plain", "value": round(deepspeed / plain, 3), "unit": "x", "goal": f"<= {goal}",
         "met": deepspeed / plain <= goal},
    ])


if __name__ == "__main__":
    main()

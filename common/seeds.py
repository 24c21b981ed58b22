"""Every seed and schedule derived from the run's `seed`, in one place.

A rerun gets the same numbers, and so does anything that replays the pipeline's schedule (the
benchmark against TRL feeds TRL the prompts and mini-batches the pipeline would see). The
multipliers are primes that keep the streams of different iterations, shards and epochs apart.
"""
from __future__ import annotations

import math


def prompt_order_seed(seed: int, epoch: int) -> int:
    """The shuffle of the prompt set for one epoch (common/data.py: iteration_prompts)."""
    return seed * 1_000_003 + epoch


def rollout_seed(seed: int, iteration: int, shard: int) -> int:
    """Sampling of one rollout shard: a shard's samples depend on its prompts and this seed only,
    so they are the same whichever worker (and however many workers) samples it."""
    return (seed * 100_003 + iteration) * 10_007 + shard


def eval_seed(seed: int, eval_set: int, shard: int) -> int:
    """Sampling of one shard of an eval set: the same for every checkpoint, so accuracies compare."""
    return (seed * 100_003 + 7_777 + eval_set) * 10_007 + shard


def train_seed(seed: int, iteration: int) -> int:
    """torch's generator in the train stage (dropout, if a model has any)."""
    return seed * 100_003 + iteration


def minibatch_seed(seed: int, iteration: int) -> int:
    """The order of prompt groups in an iteration's mini-batches (stages/train/batching.py)."""
    return seed * 7 + iteration


def lr_factor(step: int, warmup_steps: int, decay_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step `step`: linear warm-up, then constant, or with
    `decay_steps` a cosine from 1 down to `min_lr_ratio` over that many steps after the warm-up, then flat
    (verl's `lr_scheduler_type: cosine` with `min_lr_ratio`)."""
    if warmup_steps > 0 and step + 1 < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, max(0, step + 1 - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

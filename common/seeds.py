"""Every seed and schedule derived from the run's `seed`, in one place.

A rerun gets the same numbers, and so does anything that replays the pipeline's schedule (the
benchmark against TRL feeds TRL the prompts and mini-batches the pipeline would see). The
multipliers are primes that keep the streams of different iterations, shards and epochs apart.
"""
from __future__ import annotations


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


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at optimizer step `step`: linear warm-up, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

"""How an iteration's rows become optimizer steps, rank shares and micro-batches.

- A mini-batch is a set of whole prompt groups (all n responses of a prompt), prompts shuffled.
- Its rows are split over data-parallel ranks so that each rank gets about the same number of tokens.
- Each rank cuts its share into micro-batches under a token budget (dynamic batch size), so a long
  response does not force a small fixed batch size on every short one (common/batching.py, which
  also plans the teacher's batches).
None of this changes the loss: it is a token mean over the global mini-batch whatever the split.
"""
from __future__ import annotations

import random
from collections import defaultdict


def minibatches(prompt_ids: list[str], prompts_per_minibatch: int, seed: int) -> list[list[int]]:
    """Row indices of each mini-batch: whole prompt groups, prompts shuffled by `seed`."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row, prompt_id in enumerate(prompt_ids):
        groups[prompt_id].append(row)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    return [[row for pid in order[start : start + prompts_per_minibatch] for row in groups[pid]]
            for start in range(0, len(order), prompts_per_minibatch)]


def rank_share(rows: list[int], tokens: list[int], world_size: int, rank: int) -> list[int]:
    """This rank's rows: longest first, each to the rank with the fewest tokens so far (ties: lowest rank)."""
    loads = [0] * world_size
    owner: dict[int, int] = {}
    for row in sorted(rows, key=lambda r: (-tokens[r], r)):
        target = min(range(world_size), key=lambda k: (loads[k], k))
        owner[row] = target
        loads[target] += tokens[row]
    return [row for row in rows if owner[row] == rank]

"""Batches planned by tokens, for every forward over scored rows: the trainer's micro-batches and the
teacher's scoring batches. A batch of 8 rows of 8k tokens and one of 8 rows of 200 do not cost the
same, so a count of rows alone either wastes the device on short rows or runs out of memory on long
ones (dynamic batch size, as verl's `ppo_max_token_len_per_gpu`)."""
from __future__ import annotations


def micro_batches(rows: list[int], tokens: list[int], max_tokens: int, max_sequences: int) -> list[list[int]]:
    """Consecutive groups of rows (sorted by length) with at most `max_tokens` tokens and `max_sequences` rows.

    A row longer than the budget gets a micro-batch of its own rather than being dropped.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for row in sorted(rows, key=lambda r: (tokens[r], r)):
        if current and (current_tokens + tokens[row] > max_tokens or len(current) >= max_sequences):
            batches.append(current)
            current, current_tokens = [], 0
        current.append(row)
        current_tokens += tokens[row]
    if current:
        batches.append(current)
    return batches

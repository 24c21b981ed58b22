"""Prompt datasets in the DAPO-Math parquet schema: load, render with the chat template, schedule."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from common.modeling import render_prompt


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    data_source: str
    ground_truth: str
    prompt_ids: list[int]


@dataclass
class PromptSet:
    prompts: list[Prompt]
    dropped_too_long: int


def load_prompts(path: str | Path, tokenizer, max_prompt_tokens: int, enable_thinking: bool) -> PromptSet:
    table = pq.read_table(path, columns=["data_source", "prompt", "reward_model", "extra_info"])
    prompts, too_long = [], 0
    for row in table.to_pylist():
        ids = render_prompt(tokenizer, row["prompt"], enable_thinking)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(str(row["extra_info"]["index"]), row["data_source"],
                              str(row["reward_model"]["ground_truth"]), ids))
    return PromptSet(prompts, too_long)


def iteration_prompts(prompts: list[Prompt], iteration: int, per_iteration: int, seed: int) -> list[Prompt]:
    """The prompts of one iteration: consecutive slices of a seeded shuffle, reshuffled each epoch."""
    chosen = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, offset = divmod(position, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        chosen.append(prompts[order[offset]])
    return chosen

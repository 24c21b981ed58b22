"""Prompt datasets in the DAPO-Math parquet schema: load, render with the chat template, schedule."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.modeling import render_prompt
from common.shards import atomic_write_text


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


def prepared_prompts(run: Path, name: str, path: str | Path, tokenizer, max_prompt_tokens: int,
                     enable_thinking: bool) -> PromptSet:
    """`load_prompts`, rendered once per run and kept as `runs/<RUN>/prompts/<name>.parquet`.

    Every iteration samples from the same rendered prompts, so the chat template and tokenizer run
    once instead of in every generate process; the file is also there to inspect.
    """
    folder = Path(run) / "prompts"
    table_path, meta_path = folder / f"{name}.parquet", folder / f"{name}.json"
    key = {"source": str(path), "max_prompt_tokens": max_prompt_tokens, "enable_thinking": enable_thinking}
    # The metadata is written last, so its presence means the table is complete; a run continued
    # under changed data settings (FORCE=1) renders again.
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and meta["key"] == key:
        rows = pq.read_table(table_path).to_pylist()
        return PromptSet([Prompt(**row) for row in rows], meta["dropped_too_long"])
    prompt_set = load_prompts(path, tokenizer, max_prompt_tokens, enable_thinking)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([vars(p) for p in prompt_set.prompts]), tmp, compression="zstd")
    tmp.replace(table_path)
    atomic_write_text(meta_path, json.dumps({"key": key, "rows": len(prompt_set.prompts),
                                             "dropped_too_long": prompt_set.dropped_too_long}) + "\n")
    return prompt_set

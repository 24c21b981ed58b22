"""Prompt datasets in the DAPO-Math parquet schema: load, render with the chat template, schedule."""
from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import ConfigError, ContractError
from common.seeds import prompt_order_seed
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
    dropped: dict[str, int]  # reason -> rows dropped (too_long, duplicate_prompt, duplicate_id, bad_row)

    def dropped_summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self.dropped.items() if count) or "none"


def clean_message_text(text: str) -> str:
    # DAPO's boxed template stores a format-string leftover: "\boxed{{}}" means "\boxed{}".
    return text.replace("\\boxed{{}}", "\\boxed{}")


REQUIRED_COLUMNS = ["data_source", "prompt", "reward_model", "extra_info"]


def load_prompts(path: str | Path, tokenizer, max_prompt_tokens: int, enable_thinking: bool,
                 config_key: str = "data.train") -> PromptSet:
    """Prompts of a DAPO-Math-schema parquet, rendered with the chat template.

    Rows without a usable prompt or a string ground truth, repeated ids, repeated prompt texts and
    prompts over `max_prompt_tokens` are dropped and counted, never raised deep inside a stage.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config key '{config_key}': {path} does not exist")
    try:
        names = pq.read_schema(path).names
    except pa.ArrowInvalid as error:
        raise ConfigError(f"config key '{config_key}': {path} is not a readable parquet file ({error})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ConfigError(f"config key '{config_key}': {path} lacks the DAPO-Math column(s) {missing} (has {names})")
    table = pq.read_table(path, columns=REQUIRED_COLUMNS)
    kept: list[tuple[Prompt, list[dict]]] = []  # (the prompt without its ids, its messages)
    dropped = dict.fromkeys(("bad_row", "duplicate_id", "duplicate_prompt", "too_long"), 0)
    seen_ids, seen_texts = set(), set()
    for row in table.to_pylist():
        messages = row["prompt"] or []
        gold = (row["reward_model"] or {}).get("ground_truth")
        prompt_id = (row["extra_info"] or {}).get("index")
        if (not messages or not all(isinstance(m.get("content"), str) and m["content"].strip() for m in messages)
                or not isinstance(gold, str) or not gold.strip() or prompt_id is None):
            dropped["bad_row"] += 1
            continue
        messages = [{**m, "content": clean_message_text(m["content"])} for m in messages]
        text = "\n".join(m["content"] for m in messages)
        if str(prompt_id) in seen_ids:
            dropped["duplicate_id"] += 1
            continue
        if text in seen_texts:
            dropped["duplicate_prompt"] += 1
            continue
        seen_ids.add(str(prompt_id))
        seen_texts.add(text)
        kept.append((Prompt(str(prompt_id), row["data_source"] or "", gold.strip(), []), messages))
    prompts = []
    for (prompt, _), ids in zip(kept, render_prompts(tokenizer, [messages for _, messages in kept], enable_thinking)):
        if len(ids) > max_prompt_tokens:
            dropped["too_long"] += 1
            continue
        prompts.append(replace(prompt, prompt_ids=ids))
    return PromptSet(prompts, dropped)


def render_prompts(tokenizer, conversations: list[list[dict]], enable_thinking: bool) -> list[list[int]]:
    """Token ids of each chat-formatted prompt, ending with the assistant generation prompt. The texts
    are tokenized in one call: a fast tokenizer encodes them in parallel, in Rust (DAPO-Math-17k with
    Qwen3's tokenizer: docs/recipe.md, "Data")."""
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=enable_thinking)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, messages: list[dict], enable_thinking: bool) -> list[int]:
    """render_prompts for one conversation."""
    return render_prompts(tokenizer, [messages], enable_thinking)[0]


def iteration_prompts(prompts: list[Prompt], iteration: int, per_iteration: int, seed: int) -> list[Prompt]:
    """The prompts of one iteration: consecutive slices of a seeded shuffle, reshuffled each epoch."""
    chosen = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, offset = divmod(position, len(prompts))
        chosen.append(prompts[epoch_order(len(prompts), seed, epoch)[offset]])
    return chosen


# The controller plans every iteration: one shuffle per epoch, not one per iteration (~10 ms at 20k prompts).
@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of a prompt set of `size` prompts in one epoch."""
    order = list(range(size))
    random.Random(prompt_order_seed(seed, epoch)).shuffle(order)
    return tuple(order)


_READ: dict[tuple, PromptSet] = {}


def prepared_prompts(run: Path, name: str, path: str | Path, max_prompt_tokens: int, enable_thinking: bool,
                     config_key: str = "data.train", tokenizer: Callable[[], object] | None = None) -> PromptSet:
    """`load_prompts`, rendered once per run (with `tokenizer()`) and kept as
    `runs/<RUN>/prompts/<name>.parquet`; without `tokenizer` (a driver planning a stage, which loads
    no model library), a set not rendered yet is a ContractError.

    Every iteration samples from the same rendered prompts, so the chat template and tokenizer run
    once instead of in every generate process, and a process that only reads them (the resident
    controller) never imports transformers; the file is also there to inspect.
    """
    folder = Path(run) / "prompts"
    table_path, meta_path = folder / f"{name}.parquet", folder / f"{name}.json"
    # "rules" names the cleaning rules of load_prompts: a cache made under older rules is rendered again.
    key = {"source": str(path), "max_prompt_tokens": max_prompt_tokens, "enable_thinking": enable_thinking,
           "rules": 2}
    # The metadata is written last, so its presence means the table is complete; a run continued
    # under changed data settings (FORCE=1) renders again.
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and meta["key"] == key:
        # A resident controller plans every iteration: read the table once per version of the file.
        stat = table_path.stat()
        memo = (str(table_path.resolve()), stat.st_mtime_ns, stat.st_size, json.dumps(key))
        if memo not in _READ:
            rows = pq.read_table(table_path).to_pylist()
            if len(_READ) >= 8:  # a run reads its train set and a few eval sets
                del _READ[next(iter(_READ))]
            _READ[memo] = PromptSet([Prompt(**row) for row in rows], meta["dropped"])
        return _READ[memo]  # shared: callers read it, never change it
    if tokenizer is None:
        raise ContractError(f"the prompt set {name} of {path} is not rendered in {folder} (fix: rerun the same "
                            "command: the run's start renders it)")
    prompt_set = load_prompts(path, tokenizer(), max_prompt_tokens, enable_thinking, config_key)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.parquet.tmp-{os.getpid()}"  # a renderer left over from a killed run may still write
    pq.write_table(pa.Table.from_pylist([vars(p) for p in prompt_set.prompts]), tmp, compression="zstd")
    tmp.replace(table_path)
    atomic_write_text(meta_path, json.dumps({"key": key, "rows": len(prompt_set.prompts),
                                             "dropped": prompt_set.dropped}) + "\n")
    return prompt_set

"""The committed tiny-world assets: present, unaltered, loadable, and on the real recipe's code path."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.shards import file_sha256
from common.verifier import grade
from tiny_world.task import DAPO_SCHEMA, parse_question, worked_solution

ASSETS = Path("assets/tiny")
MOPD = Path("assets/tiny-mopd")  # the two-domain world of several teachers (tiny_world/mopd.py)


@pytest.mark.parametrize("assets", [ASSETS, MOPD], ids=["tiny", "tiny-mopd"])
def test_checksums_match(assets):
    lines = (assets / "SHA256SUMS").read_text().splitlines()
    assert len(lines) >= 15
    for line in lines:
        digest, name = line.split("  ", 1)
        assert file_sha256(assets / name) == digest, name


@pytest.mark.parametrize("assets", [ASSETS, MOPD], ids=["tiny", "tiny-mopd"])
def test_assets_are_small(assets):
    assert sum(p.stat().st_size for p in assets.rglob("*") if p.is_file()) < 20 * 2**20


def test_the_subtraction_domain_is_worked_borrow_by_borrow_and_graded_right():
    from tiny_world.mopd import SUB, problem

    text, solution, answer = problem(SUB, 37, 302)  # the larger operand first
    assert text.startswith("What is 302 - 37?") and answer == "265"
    assert solution.splitlines() == ["12-7-0=5", "10-3-1=6", "3-0-1=2", "So 302-37=\\boxed{265}."]
    assert grade(solution, answer).correct


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_models_load_as_qwen3(model):
    loaded = AutoModelForCausalLM.from_pretrained(ASSETS / model)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in loaded.parameters()) < 2_000_000


def test_splits_follow_the_dapo_schema_and_are_disjoint():
    train, evaluation = (pq.read_table(ASSETS / "data" / f"{split}.parquet") for split in ("train", "eval"))
    assert train.schema.remove_metadata() == DAPO_SCHEMA and evaluation.schema.remove_metadata() == DAPO_SCHEMA
    question = lambda row: row["prompt"][0]["content"]
    train_questions = {question(r) for r in train.to_pylist()}
    eval_rows = evaluation.to_pylist()
    assert not train_questions & {question(r) for r in eval_rows}
    for row in eval_rows[:50]:
        assert question(row).endswith("put your final answer within \\boxed{}.")
        a, b = parse_question(question(row))
        assert grade(worked_solution(a, b), row["reward_model"]["ground_truth"]).correct


def test_the_two_domain_splits_are_disjoint_and_hold_each_problem_once():
    """(a, b) and (b, a) are one subtraction problem: the builder keeps it once, so no eval problem of
    either domain is in the train split or twice in its eval split."""
    question = lambda row: row["prompt"][0]["content"]
    train = [question(r) for r in pq.read_table(MOPD / "data" / "train.parquet").to_pylist()]
    assert len(set(train)) == len(train) == 20000
    for name in ("eval-add", "eval-sub"):
        evaluation = [question(r) for r in pq.read_table(MOPD / "data" / f"{name}.parquet").to_pylist()]
        assert len(set(evaluation)) == len(evaluation) == 500 and not set(evaluation) & set(train), name


def test_tokenizer_round_trips_and_renders_the_chat_template():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "What is 347 + 85? Please reason step by step.\n" + worked_solution(347, 85)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert rendered == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")

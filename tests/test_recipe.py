"""The card's recipe: its config value by value, DAPO ingestion on the real files, and evaluation
(avg@k per benchmark, `make eval`) on the real benchmark files with the tiny student."""
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import SHARED_DATA, needs_shared

from common import shards
from common.config import load_config
from common.data import load_prompts
from common.modeling import load_tokenizer
from common.verifier import grade
from orchestrator.loop import prepare_run

RECIPE = "configs/qwen3-1.7b-opd-dapo.yaml"
TOKENIZER = "assets/tiny/student"  # no Qwen3 tokenizer offline: the tiny one renders the real prompts

# The model card's values (https://huggingface.co/lllyx/Qwen3-1.7B-Base-OPD) -> our config keys.
CARD = {
    "model.student": "Qwen/Qwen3-1.7B-Base",
    "model.teacher": "lllyx/Qwen3-4B-Base-GRPO",
    "generate.n": 4,                              # responses per prompt
    "data.max_prompt_tokens": 1024,               # prompt length
    "generate.max_response_tokens": 7168,         # response length
    "generate.max_model_len": 8193,               # max rollout model length
    "generate.prompts_per_iteration": 64,         # train batch size
    "train.mini_batch_prompts": 16,               # PPO mini-batch size
    "train.max_tokens_per_micro_batch": 8192,     # max PPO token length per GPU (dynamic batch size)
    "train.lr": 1e-6,
    "data.epochs": 1,
    "train.keep_checkpoint_every": 20,            # save frequency
    "data.enable_thinking": False,
    "train.bf16": True,
    "train.gradient_checkpointing": True,
    "train.packing": True,                        # padding removal
    "train.offload_params": True,
    "train.offload_optimizer": True,
    "train.loss": "k1",
    "train.policy_gradient": True,
    "train.use_task_rewards": False,
    "score.reward_mode": "deepscaler",
    "generate.temperature": 1.0,
}


def value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("key", sorted(CARD))
def test_recipe_config_matches_the_card(key):
    assert value(load_config(RECIPE), key) == CARD[key]


@needs_shared
def test_recipe_evaluates_the_papers_benchmarks_with_its_sampling():
    e = load_config(RECIPE).eval
    assert [Path(p).name for p in e.sets] == ["eval-AIME24.parquet", "eval-AIME25.parquet", "eval-AMC23.parquet",
                                              "eval-MATH-500.parquet"]
    assert (e.temperature, e.top_p) == (0.7, 0.95)
    assert all(Path(p).exists() for p in e.sets)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@needs_shared
@pytest.mark.parametrize("template", ["boxed", "answer"])
def test_dapo_ingestion_on_the_real_files(tokenizer, template):
    path = SHARED_DATA / f"dapo-math-17k-{template}-template.parquet"
    raw = pl.read_parquet(path)
    texts = raw.select(pl.col("prompt").list.first().struct.field("content")).to_series()
    prompt_set = load_prompts(path, tokenizer, max_prompt_tokens=1024, enable_thinking=False)
    dropped = prompt_set.dropped
    assert len(prompt_set.prompts) + sum(dropped.values()) == raw.height == 17_917
    assert dropped["duplicate_prompt"] == raw.height - texts.n_unique() == 519
    assert dropped["too_long"] > 0 and dropped["bad_row"] == 0
    assert len({p.prompt_id for p in prompt_set.prompts}) == len(prompt_set.prompts)
    assert all(len(p.prompt_ids) <= 1024 for p in prompt_set.prompts)
    rendered = tokenizer.decode(prompt_set.prompts[0].prompt_ids)
    assert "{{}}" not in rendered and "<|im_start|>assistant" in rendered
    if template == "boxed":
        assert texts.str.contains("boxed{{}}", literal=True).all()  # the file's literal doubled braces...
        assert "\\boxed{}" in rendered  # ...rendered as single ones
    else:
        assert "Answer:" in rendered


def test_bad_rows_are_dropped_and_counted(tmp_path, tokenizer):
    def row(index, content="What is 1 + 1?", gold="2"):
        return {"data_source": "t", "prompt": [{"role": "user", "content": content}] if content is not None else [],
                "reward_model": {"ground_truth": gold, "style": "rule"}, "extra_info": {"index": index}}

    rows = [row("a"), row("b", content=None), row("c", content="   "), row("d", gold=""), row("e", gold=None),
            row("a", content="What is 2 + 2?", gold="4"), row("f"), row("g", content="x " * 2000)]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    prompt_set = load_prompts(path, tokenizer, max_prompt_tokens=256, enable_thinking=False)
    assert [p.prompt_id for p in prompt_set.prompts] == ["a"]
    assert prompt_set.dropped == {"bad_row": 4, "duplicate_id": 1, "duplicate_prompt": 1, "too_long": 1}


def test_amc_golds_grade_as_integers():
    assert grade("so \\boxed{142}", "142.0").correct
    assert not grade("so \\boxed{14.2}", "142.0").correct


@needs_shared
def test_make_eval_reports_avg_at_k_per_benchmark(tmp_path):
    """`python -m orchestrator eval` on v0000 of a fresh run: the tiny eval split and AMC23, k = 2."""
    run = tmp_path / "evalrun"
    config = load_config("configs/tiny.yaml", [
        "data.max_prompt_tokens=1024", "eval.prompts=6", "eval.max_response_tokens=16",
        "eval.sets=[assets/tiny/data/eval.parquet, ../shared/data/eval-AMC23.parquet]"])
    prepare_run(run, config, force=False)
    result = subprocess.run([sys.executable, "-m", "orchestrator", "eval", "--run", str(run), "--k", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = shards.stage_dir(run, 0, "eval-k2")
    rows = pl.read_parquet(out_dir / "*.parquet")
    assert rows.height == 2 * 6 * 2 and sorted(rows["data_source"].unique()) == ["AMC23", "tiny_arith"]
    assert rows.group_by("prompt_id").len()["len"].to_list() == [2] * 12
    metrics = json.loads((out_dir / shards.MANIFEST).read_text())["metrics"]
    tiny = rows.filter(pl.col("data_source") == "tiny_arith")["correct"].mean()
    assert metrics["eval-k2/tiny_arith/accuracy"] == pytest.approx(tiny)
    assert "eval-k2/AMC23/accuracy" in metrics

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{run.parent / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = mlflow.MlflowClient().get_metric_history(run_id, "eval-k2.AMC23.accuracy")
    assert [m.step for m in history] == [0]

"""The card's recipe at the real vocabulary and widths (`make rehearse`): Qwen3's tokenizer, the real
DAPO prompts, random-weight models of Qwen3-1.7B-Base's and Qwen3-4B-Base's shapes (2 layers).

Both are slow: the models are ~2 GiB to build and a forward at vocab 151,936 costs seconds on 2 cores.
The small variant is one 16-token iteration under ZeRO-1 (minutes); the full one is the rehearsal of
docs/recipe.md (ZeRO-3 with offload, 8192-token micro-batches, two per step)."""
import subprocess
import sys

import pytest
from pipeline_helpers import ROOT, needs_shared

from common import shards
from orchestrator.checks import check_run
from orchestrator.runs import run_config

MODELS = ROOT / "assets" / "rehearsal"


@pytest.fixture(scope="module")
def models():
    """Builds Qwen3's tokenizer and the real-width models once if missing (both checksummed)."""
    for target in ("qwen3-tokenizer", "rehearsal-models"):
        result = subprocess.run(["make", target], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    return MODELS


def rehearse(run, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rehearsal.rehearse", "--run", str(run), *extra], cwd=ROOT,
                          capture_output=True, text=True)


def assert_rehearsed(run, result, micro_batches: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert check_run(run) == (1, [])
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("rehearse iter 0: generate ") and "peak RSS" in last, last
    train = shards.read_manifest(shards.stage_dir(run, 0, "train"))["metrics"]
    assert train["train/micro_batches_per_step"] >= micro_batches
    assert train["train/logprob_gap_mean"] < 1e-3  # the sampler's log-probs are the trainer's, at vocab 151,936


@pytest.mark.slow
@needs_shared
def test_the_small_rehearsal_trains_at_the_real_vocabulary_and_passes_check(models, tmp_path):
    run = tmp_path / "rehearse-small"
    assert_rehearsed(run, rehearse(run, "--small"), micro_batches=2)


@pytest.mark.slow
@needs_shared
def test_the_full_rehearsal_keeps_the_cards_settings_and_passes_check(models, tmp_path):
    run = tmp_path / "rehearse"
    result = rehearse(run)
    assert_rehearsed(run, result, micro_batches=2)
    t = run_config(run).train  # the frozen config: the card's training settings stand
    assert (t.zero_stage, t.offload_params, t.offload_optimizer, t.packing, t.gradient_checkpointing) == (
        3, True, True, True, True)
    assert (t.max_tokens_per_micro_batch, t.loss, t.policy_gradient, t.lr) == (8192, "k1", True, 1e-6)

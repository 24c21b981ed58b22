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
from common.run import load_run_config
from orchestrator.checks import check_run

MODELS = ROOT / "assets" / "rehearsal"


@pytest.fixture(scope="module")
def models():
    """Builds Qwen3's tokenizer and the real-width models once if missing (both checksummed)."""
    for target in ("qwen3-tokenizer", "rehearsal-models"):
        result = subprocess.run(["make", target], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    return MODELS


def rehearse(run, *extra: str) -> subprocess.CompletedProcess:
    # A worker paused by Dask's memory manager hangs the run without a word: the timeout turns that into a failure.
    return subprocess.run([sys.executable, "-m", "rehearsal.rehearse", "--run", str(run), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)


def assert_rehearsed(run, result, micro_batches: int, iterations: int = 1) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert check_run(run) == (iterations, [])
    lines = result.stdout.strip().splitlines()
    for i in range(iterations):
        assert any(line.startswith(f"rehearse iter {i}: generate ") and "peak RSS" in line for line in lines), lines
        assert any(line.startswith(f"checkpoint v{i + 1:04d}: export ") for line in lines), lines
        train = shards.read_manifest(shards.stage_dir(run, i, "train")).metrics
        assert train["train/micro_batches_per_step"] >= micro_batches
        assert train["train/logprob_gap_mean"] < 1e-3  # the sampler's log-probs are the trainer's, at vocab 151,936


@pytest.mark.slow
@needs_shared
def test_the_small_rehearsal_runs_two_resident_iterations_at_the_real_widths(models, tmp_path):
    """One worker keeps the real-width engine, teacher and trainer (13 GB here, beyond the 80% of its
    share of the machine at which Dask pauses a worker by default): both iterations finish."""
    run = tmp_path / "rehearse-small"
    assert_rehearsed(run, rehearse(run, "--small", "--iterations", "2"), micro_batches=2, iterations=2)
    assert load_run_config(run).orchestrator.mode == "resident"


@pytest.mark.slow
@needs_shared
def test_the_full_rehearsal_keeps_the_cards_settings_and_passes_check(models, tmp_path):
    run = tmp_path / "rehearse"
    result = rehearse(run)
    assert_rehearsed(run, result, micro_batches=2)
    t = load_run_config(run).train  # the frozen config: the card's training settings stand
    assert (t.zero_stage, t.offload_params, t.offload_optimizer, t.packing, t.gradient_checkpointing) == (
        3, True, True, True, True)
    assert (t.max_tokens_per_micro_batch, t.loss, t.policy_gradient, t.lr) == (8192, "k1", True, 1e-6)

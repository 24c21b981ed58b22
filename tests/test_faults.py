"""Crash anywhere, resume, lose nothing: kill -9 at the worst moments (common/faults.py), corrupt
files, feed bad data, fill the disk; after each, the run's invariants hold (orchestrator/checks.py)
and the result equals the uninterrupted reference run bit for bit.

`make faults` runs a longer randomised campaign (tests/fault_campaign.py)."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import OVERRIDES, assert_same_as_reference, orchestrate, rollout_digests

from common import shards
from common.data import load_prompts
from common.errors import ConfigError
from common.modeling import load_tokenizer
from orchestrator.checks import check_run


def copy_run(reference: Path, run: Path) -> None:
    """The run folder and its MLflow database (the run id inside the folder points into it)."""
    shutil.copytree(reference, run)
    shutil.copy(reference.parent / "mlflow.db", run.parent / "mlflow.db")


def test_reference_run_holds_every_invariant(reference_run):
    assert check_run(reference_run) == (2, [])


# The default suite kills one of each: a generation worker, the trainer rank, the controller. Every
# kill in both modes: `make test-slow`; random moments and targets: `make faults`.
@pytest.mark.parametrize("mode, faults", [
    ("resident", ("shard:1", "train_step:1", "state:1", "manifest:2")),
    pytest.param("resident", ("shard:1", "train_step:1", "mlflow:2", "checkpoint:1", "state:2", "manifest:2"),
                 marks=pytest.mark.slow),
    pytest.param("subprocess", ("shard:1", "train_step:1", "mlflow:2", "checkpoint:1", "state:1"), marks=pytest.mark.slow),
], ids=["resident", "resident-every-kill", "subprocess"])
def test_kill_9_at_the_worst_moments_then_resume(reference_run, tmp_path, mode, faults):
    """Killed while writing a shard, inside a training step, between logging metrics and recording
    it, after sealing a checkpoint's policy but before renaming it, after writing its optimizer state
    but before DONE (resident: while the next iteration samples from that policy), and (resident:
    the controller seals every folder) before a manifest: each resume picks up where it was. In
    resident mode the shard, train-step, checkpoint and state kills hit a worker (a generation worker,
    the trainer rank), the others the controller."""
    run = tmp_path / "faulted"
    mode_override = ("-o", f"orchestrator.mode={mode}")
    for fault in faults:
        result = orchestrate(run, 2, *mode_override, fault=fault)
        assert result.returncode != 0, f"{fault} was never reached"
        killed_orchestrator = result.returncode == -signal.SIGKILL
        killed_stage = f"exit code {-signal.SIGKILL}" in result.stderr or "a worker died" in result.stderr
        assert killed_orchestrator or killed_stage, result.stderr[-2000:]
    finished = orchestrate(run, 2 - len(list(run.glob("iter=*/train/_MANIFEST.json"))), *mode_override)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Same seed and config as the reference: byte-identical rollouts and identical checkpoints.
    assert_same_as_reference(run, reference_run)


def group_members(group: int) -> dict[int, str]:
    """pid -> command line of every live process of a process group (from /proc)."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                members[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            pass  # gone meanwhile
    return members


def test_a_controller_killed_during_start_up_leaves_no_process_behind(tmp_path):
    """kill -9 of the controller once the prompt sets are rendered, while the process that rendered
    them waits to be shut down and the embedded workers start: the whole group is gone soon after.
    `make faults` found that renderer (a spawned pool process) waiting for work forever."""
    command = [sys.executable, "-m", "orchestrator", "iterate", "--run", str(tmp_path / "run"), "--config",
               "configs/tiny.yaml", "-n", "1", *[a for o in OVERRIDES for a in ("-o", o)],
               "-o", "orchestrator.mode=resident"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OPD_FAULT": "rendered"})
    try:
        assert process.wait(timeout=120) == -signal.SIGKILL
        deadline = time.time() + 15
        while group_members(process.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert group_members(process.pid) == {}
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_corrupt_shard_and_checkpoint_are_detected_and_redone(reference_run, tmp_path):
    run = tmp_path / "corrupt"
    copy_run(reference_run, run)
    # Iteration 1 interrupted after scoring, and its scored shard truncated since.
    shards.reset_stage(shards.stage_dir(run, 1, "train"))
    shutil.rmtree(shards.checkpoint_dir(run, 2))
    scored = next(shards.stage_dir(run, 1, "scored").glob("part-*.parquet"))
    scored.write_bytes(scored.read_bytes()[: scored.stat().st_size // 2])
    result = orchestrate(run, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not match its manifest sha256" in result.stderr and "score iter 1" in result.stdout
    assert_same_as_reference(run, reference_run)

    # A flipped byte in the latest checkpoint: its training is redone, to the same weights.
    weights = shards.checkpoint_dir(run, 2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = orchestrate(run, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training iteration 1 again" in result.stderr and "train iter 1" in result.stdout
    assert_same_as_reference(run, reference_run)


def test_a_manifest_naming_a_missing_file_is_rejected(reference_run, tmp_path):
    run = tmp_path / "missing"
    copy_run(reference_run, run)
    next(shards.stage_dir(run, 1, "scored").glob("part-*.parquet")).unlink()
    finished, problems = check_run(run)
    assert any("is named in the manifest but missing" in p for p in problems)
    result = subprocess.run([sys.executable, "-m", "stages.train", "--run", str(run), "--iter", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0  # already trained: nothing to do, nothing read
    shards.reset_stage(shards.stage_dir(run, 1, "train"))
    result = subprocess.run([sys.executable, "-m", "stages.train", "--run", str(run), "--iter", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing" in result.stderr


def test_a_write_error_leaves_nothing_half_written(reference_run, tmp_path):
    """The disk fills up while the generate stage writes (a 4 kB file-size limit: shards are ~8 kB)."""
    run = tmp_path / "full"
    copy_run(reference_run, run)
    for stage in ("rollouts", "scored", "train", "eval"):
        shards.reset_stage(shards.stage_dir(run, 1, stage))
    shutil.rmtree(shards.checkpoint_dir(run, 2))

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write raises instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000))

    result = subprocess.run([sys.executable, "-m", "stages.generate", "--run", str(run), "--iter", "1"],
                            capture_output=True, text=True, preexec_fn=small_disk)
    assert result.returncode != 0 and "File too large" in result.stderr
    for stage in ("rollouts", "eval"):
        out_dir = shards.stage_dir(run, 1, stage)
        assert not list(out_dir.glob("part-*")) and not (out_dir / shards.MANIFEST).exists()
    # Space is back: the stage is redone from scratch, to the same bytes as the reference.
    result = subprocess.run([sys.executable, "-m", "stages.generate", "--run", str(run), "--iter", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert rollout_digests(run) == rollout_digests(reference_run)


def test_bad_data_stops_with_one_line(tmp_path):
    """Nothing usable in data.train: one error line naming the key, through the whole command."""
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "x", "prompt": [], "reward_model": {"ground_truth": "1"}, "extra_info": {"index": "a"}},
        {"data_source": "x", "prompt": [{"role": "user", "content": "2+2?"}], "reward_model": {"ground_truth": None},
         "extra_info": {"index": "b"}}]), path)
    result = orchestrate(tmp_path / "run", 1, "-o", f"data.train={path}", "-o", "eval.every=0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "data.train" in errors[0] and "no usable prompts" in errors[0] and "2 bad_row" in errors[0]


@pytest.mark.parametrize("case", ["missing_file", "wrong_columns", "not_parquet"])
def test_unreadable_data_is_a_config_error_naming_the_key(tmp_path, case):
    path = tmp_path / "data.parquet"
    if case == "wrong_columns":
        pq.write_table(pa.table({"question": ["2+2?"], "answer": ["4"]}), path)
    elif case == "not_parquet":
        path.write_text("question,answer\n2+2?,4\n")
    with pytest.raises(ConfigError) as error:
        load_prompts(path, load_tokenizer("assets/tiny/student"), 128, False, "data.train")
    assert str(error.value).startswith("config key 'data.train': ") and "\n" not in str(error.value)

"""`make gpu-check CPU=1`: every check of the GPU check runs its code path at small shapes on this CPU
(gloo for NCCL), so that the minutes of a lent GPU only meet the GPU (bench/gpu_check.py)."""
import json
import subprocess
import sys

import pytest
from pipeline_helpers import ROOT


@pytest.mark.slow
def test_every_gpu_check_runs_its_code_path_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    results = [json.loads(line) for line in (tmp_path / "gpu-check.jsonl").read_text().splitlines()]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [r["status"] for r in results] == ["ok"] * len(results)
    names = [r["check"] for r in results]
    assert names == ["preflight", "train_zero3", "export_gate", "accumulation", "train_zero1", "packed", "generate",
                     "stages"]
    by_name = {r["check"]: r for r in results}
    assert by_name["export_gate"]["stale_engine"].startswith("the hf engine's weights")
    assert by_name["train_zero3"]["micro_batches"] >= 2
    assert by_name["packed"]["max_abs_diff"] < 1e-3
    assert by_name["stages"]["orchestrator_check"][0].endswith("2 finished iteration(s), 0 problem(s)")

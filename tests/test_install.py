"""The GPU machine's install, proven from this CPU machine against the real registry (`make gpu-resolve`).
Slow: it asks PyPI (about a minute); CI runs the same through `make gpu-resolve` in .ci/run."""
import json
import subprocess
import sys

import pytest
from pipeline_helpers import ROOT


def resolve_gpu(tmp_path, *pins: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "install/resolve_gpu.py", "--out", str(tmp_path),
                           *[a for pin in pins for a in ("--pin", pin)]], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_the_gpu_install_resolves_with_a_cuda_torch_at_the_projects_pin(tmp_path):
    result = resolve_gpu(tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["versions"]["torch"] == "2.13.0" and summary["versions"]["vllm"] == "0.32.0"
    assert any(name.startswith("nvidia-nccl") for name in summary["cuda_runtime"])


@pytest.mark.slow
def test_a_torch_pin_that_vllm_does_not_take_is_refused_in_one_line(tmp_path):
    """The negative control: vLLM 0.32.0 pins torch 2.13.0, so a project pinned at 2.12.0 cannot install."""
    result = resolve_gpu(tmp_path, "torch==2.12.0")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: the GPU install does not resolve")
    assert result.stderr.strip().count("\n") == 0

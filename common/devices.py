"""Which device each worker and rank computes on: one place for the GPU layout of a node.

A resident worker is pinned to one GPU with `CUDA_VISIBLE_DEVICES=<gpu>`, so inside it "cuda" (device
0) is its own GPU: its generation engine, its teacher and its training rank all land there, and
NCCL finds one distinct device per rank. `worker_layout` decides, for one machine, how many workers
there are, which GPU each gets and which roles (Dask resources) each carries; both the embedded
cluster and `python -m orchestrator workers` start exactly what it returns.

Torch-free at import (the controller plans the layout without it): GPUs are counted from the NVIDIA
driver (`/proc/driver/nvidia/gpus`, else `nvidia-smi -L`), restricted by `CUDA_VISIBLE_DEVICES`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.errors import ConfigError

Role = Literal["generate", "score", "train"]
ROLES: tuple[Role, ...] = ("generate", "score", "train")
GENERATE: Role = "generate"  # the workers that sample (generation engine)
SCORE: Role = "score"  # the workers that hold the teachers


def train_role(rank: int) -> str:
    """The Dask resource of the worker that keeps data-parallel rank `rank`'s DeepSpeed engine."""
    return f"train-rank-{rank}"


def nvidia_gpus() -> int:
    """How many NVIDIA GPUs the driver reports on this machine (0 without a driver)."""
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir():
        return sum(1 for _ in driver.iterdir())
    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs); all the
    driver's when it is unset; none on a machine without an NVIDIA driver, whatever it says.
    `CUDA_VISIBLE_DEVICES=` (empty) hides every GPU: a CPU run, on purpose."""
    count = nvidia_gpus()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if count == 0:
        return []
    if listed is None:
        return [str(index) for index in range(count)]
    return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process of a machine: its name, its GPU (None on a CPU) and its Dask resources."""
    name: str
    gpu: str | None
    resources: dict[str, float] = field(default_factory=dict)

    def environment(self, threads: int) -> dict[str, str]:
        """The worker's own variables: its GPU, and torch's CPU threads (Dask's default would be 1)."""
        env = {"OMP_NUM_THREADS": str(threads)}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


def worker_layout(gpus: list[str], workers: int = 0, roles: tuple[Role, ...] = ROLES, first_rank: int = 0,
                  ranks: int | None = None, prefix: str = "worker") -> list[WorkerSpec]:
    """The workers of one machine: one per GPU in `gpus` (`workers` must then be 0 or equal), or
    `workers` CPU workers when `gpus` is empty. Worker i carries every role in `roles`; with "train"
    it keeps rank `first_rank + i` (only ranks below `ranks`, when given: the embedded cluster starts
    exactly train.processes ranks). A second node passes `first_rank` = the ranks of the nodes before.
    """
    if gpus and workers not in (0, len(gpus)):
        raise ConfigError(f"config key 'cluster.workers': {workers} workers on {len(gpus)} GPU(s) "
                          f"({','.join(gpus)}): one worker per GPU (fix: set it to 0 or {len(gpus)})")
    count = len(gpus) or max(workers, 1)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ConfigError(f"roles {','.join(unknown) or '(none)'}: not a role of this pipeline (fix: choose among "
                          f"{','.join(ROLES)})")
    specs = []
    for index in range(count):
        resources = {role: 1.0 for role in roles if role != "train"}
        rank = first_rank + index
        if "train" in roles and (ranks is None or rank < ranks):
            resources[train_role(rank)] = 1.0
        specs.append(WorkerSpec(f"{prefix}-{gpus[index] if gpus else index}", gpus[index] if gpus else None,
                                resources))
    return specs


def embedded_layout(workers: int, train_processes: int, gpus: list[str] | None = None) -> list[WorkerSpec]:
    """The embedded cluster of a resident run on this machine: one worker per visible GPU (or
    `cluster.workers` of them on a CPU, 1 when it is 0), every role on each, and train.processes ranks
    on the first workers. More ranks than GPUs would put two NCCL ranks on one device: refused."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        if train_processes > len(gpus):
            raise ConfigError(f"config key 'train.processes': {train_processes} ranks on {len(gpus)} visible GPU(s): "
                              f"one rank per GPU (fix: train.processes <= {len(gpus)}, or add nodes with "
                              "`python -m orchestrator workers` and cluster.address)")
        return worker_layout(gpus, workers, ranks=train_processes)
    return worker_layout([], max(workers, train_processes, 1), ranks=train_processes)


def threads_per_worker(workers: int) -> int:
    """torch's CPU threads in each of `workers` workers on this machine: an OMP_NUM_THREADS the user
    set wins; else the cores shared out (4 workers on 16 cores: 4 each; one worker: every core)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // max(workers, 1))


# Dense bf16 peaks (TFLOP/s per device, from the vendors' data sheets), found in torch's device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(configured_tflops: float = 0.0) -> float | None:
    """The device's peak in FLOP/s: `cluster.peak_tflops` when set, else from the GPU's name; None on
    a CPU or an unknown GPU (then no mfu is logged: a made-up peak would make it meaningless)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def check_torch_sees_the_gpus(gpus: list[str] | None = None) -> None:
    """Stop with one line when this machine has NVIDIA GPUs visible (`gpus`, default visible_gpus())
    but torch cannot use them: a CPU build of torch on a GPU machine would run every stage on the CPU
    in fp32, without a word."""
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ", a CPU build")
        raise ConfigError(f"this machine has {len(gpus)} visible NVIDIA GPU(s) but {build} cannot use them, so every "
                          "stage would run on the CPU in fp32 (fix: `make venv` on this machine installs the CUDA "
                          "build; to run on the CPU on purpose, set CUDA_VISIBLE_DEVICES=)")


def main() -> int:
    """`python -m common.devices` (run by `make venv`): one line on what torch sees, or why it cannot."""
    import torch

    try:
        check_torch_sees_the_gpus()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    gpus = visible_gpus()
    where = f"{torch.cuda.device_count()} of {len(gpus)} visible GPU(s)" if gpus else "the CPU (no NVIDIA GPU visible)"
    print(f"devices: torch {torch.__version__} computes on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

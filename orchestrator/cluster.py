"""The Dask cluster of a resident run: an embedded one on this machine, or the scheduler at `cluster.address`.

Roles are placed with Dask worker resources: `generate` and `score` (any number of workers each;
one shard at a time per worker), and `train-rank-<r>` (the worker that keeps data-parallel rank r's
DeepSpeed engine). Which worker gets which GPU and roles is `common/devices.py: worker_layout`: the
embedded cluster starts one worker per visible GPU (or `cluster.workers` on a CPU), each with every
role, ranks 0..train.processes-1 on the first ones. On a real cluster, start a scheduler and, on each
machine, the workers of its GPUs with one command (docs/recipe.md has the layouts):

    dask scheduler --port 8786
    python -m orchestrator workers --scheduler tcp://head:8786 --gpus 0,1,2,3 [--first-rank 4] [--roles score]

Every worker, embedded or started by that command, is a non-daemonic process (vLLM's EngineCore and
the verifier's pool start processes of their own), runs one task at a time with torch's threads
shared out over the machine's workers (Dask would set OMP_NUM_THREADS=1: other fp32 rounding than a
stage process), has no Dask memory limit (a worker holding a trainer, an engine and a teacher is
meant to be large: Dask would pause it at 80% of its share of the machine, silently, and the run
would hang), and retries nothing: a killed worker fails the stage, and the next `make iterate`
resumes at the first unsealed output (docs/reliability.md). The controller refuses, in one line,
workers started otherwise (daemonic, or with a memory limit) before anything runs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from typing import Iterator

from distributed import Client, Nanny, Scheduler, SpecCluster

from common.config import Config
from common.devices import GENERATE, SCORE, WorkerSpec, embedded_layout, threads_per_worker, train_role
from common.errors import ConfigError
from orchestrator.roles import Roles, close_roles

# Dask's settings for every worker of a resident run (read where the worker processes are started).
WORKER_SETTINGS = {
    "distributed.worker.daemon": False,
    # Dask's defaults here set OMP_NUM_THREADS=1 (other fp32 rounding than a stage process) and
    # MALLOC_TRIM_THRESHOLD_=64 kB, which hands torch's freed tensors back to the kernel only to
    # fault them in again: sampling ran 2.3x slower in a worker than in a process with it.
    "distributed.nanny.pre-spawn-environ": {},
    # The statistical profiler takes the GIL every 10 ms, from the Python loop of HF sampling too.
    "distributed.worker.profile.enabled": False,
    "distributed.scheduler.allowed-failures": 0,
    # A model resident in memory is the point: no spilling, pausing or terminating (memory_limit=0
    # below turns the memory manager off; these keep it off for a worker given a limit anyway).
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
}


def nanny_options(spec: WorkerSpec, threads: int, host: str | None = None) -> dict:
    """What a Nanny needs to start `spec`'s worker: one task slot, its roles, its GPU, no memory limit."""
    return {"name": spec.name, "nthreads": 1, "resources": dict(spec.resources), "memory_limit": 0,
            "env": spec.environment(threads), "silence_logs": logging.ERROR, **({"host": host} if host else {})}


def embedded_workers(config: Config) -> dict:
    specs = embedded_layout(config.cluster.workers, config.train.processes)
    threads = threads_per_worker(len(specs))
    return {index: {"cls": Nanny, "options": nanny_options(spec, threads, host="127.0.0.1")}
            for index, spec in enumerate(specs)}


def _worker_process() -> dict:
    """Run on each worker: what the controller checks before anything is sent to it (torch-free)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    total = None
    if gpu and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i",
                                gpu.split(",")[0]], capture_output=True, text=True)
        total = float(query.stdout.split()[0]) / 1024 if query.returncode == 0 and query.stdout.strip() else None
    return {"daemon": multiprocessing.current_process().daemon, "gpu": gpu, "gpu_total_gib": total,
            "threads": os.environ.get("OMP_NUM_THREADS")}


def parameters(model_config: dict) -> int:
    """A decoder's parameter count from its config.json (Qwen3/Llama layout; a tied LM head counted once)."""
    hidden, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    head_dim = model_config.get("head_dim") or hidden // model_config["num_attention_heads"]
    attention = hidden * head_dim * (2 * model_config["num_attention_heads"] + 2 * model_config["num_key_value_heads"])
    per_layer = attention + 3 * hidden * model_config["intermediate_size"] + 2 * hidden + 2 * head_dim
    return vocab * hidden * (1 if model_config.get("tie_word_embeddings", False) else 2) + layers * per_layer + hidden


def gpu_memory_plan(config: Config, student: dict, teacher: dict, total_gib: float) -> tuple[str, list[str]]:
    """Each role's share of one GPU when a worker holds all three (the card's layout), in the two
    phases that alternate: sampling and scoring (engine + teacher), then training (the trainer, with
    the engine asleep). One line to print, and the phases that do not fit (an empty list when all do).
    The trainer's and the teacher's figures are estimates from the shapes; vLLM's is its setting."""
    g, s, t = config.generate, config.score, config.train
    gib = 2**30
    n_student, n_teacher = parameters(student), parameters(teacher)
    teacher_weights = 2 * n_teacher / gib  # bf16
    # The teacher's forward: one chunk of fp32 logits, and a batch's activations (hidden and MLP) in bf16.
    teacher_work = (s.logit_chunk_tokens * teacher["vocab_size"] * 4
                    + s.max_tokens_per_batch * 2 * (4 * teacher["hidden_size"] + 3 * teacher["intermediate_size"])) / gib
    if g.engine == "vllm":
        engine, engine_asleep = g.gpu_memory_utilization * total_gib, 0.0
        engine_text = f"vLLM {engine:.0f} GiB (generate.gpu_memory_utilization {g.gpu_memory_utilization})"
    else:
        engine_asleep = 2 * n_student / gib
        engine = engine_asleep + (g.kv_cache_gib or 0.6 * (total_gib - engine_asleep - teacher_weights))
        engine_text = f"HF engine {engine:.0f} GiB (weights + KV budget)"
    # The trainer: resident (from the run's start, opened beside the engine) are its bf16 weights unless
    # ZeRO-3 offloads them and its optimizer state unless offloaded; while it trains, also the
    # checkpointed activations of one micro-batch, a layer's full activations, one chunk of logits and
    # its gradient.
    micro = t.max_tokens_per_micro_batch
    trainer_resident = ((0 if t.offload_params else 2 * n_student / (t.processes if t.zero_stage == 3 else 1))
                        + (0 if t.offload_optimizer else 12 * n_student / (t.processes if t.zero_stage else 1))) / gib
    trainer = trainer_resident + (micro * student["hidden_size"] * 2 * student["num_hidden_layers"]
                                  + micro * 2 * (4 * student["hidden_size"] + 3 * student["intermediate_size"])
                                  + 2 * t.logit_chunk_tokens * student["vocab_size"] * 4) / gib
    sampling = engine + teacher_weights + teacher_work + trainer_resident
    training = trainer + teacher_weights + engine_asleep
    line = (f"GPU memory plan per worker ({total_gib:.0f} GiB): sampling and scoring {sampling:.0f} GiB = "
            f"{engine_text} + teacher {teacher_weights:.0f} GiB weights + ~{teacher_work:.0f} GiB per batch"
            + (f" + the resident trainer's ~{trainer_resident:.0f} GiB" if trainer_resident >= 0.5 else "")
            + f"; training ~{training:.0f} GiB = trainer ~{trainer:.0f} GiB + the teacher's weights"
            + (f" + the HF engine's {engine_asleep:.0f} GiB" if engine_asleep else " (vLLM asleep)"))
    over = [f"{phase} needs ~{need:.0f} GiB of {total_gib:.0f}" for phase, need in
            (("sampling and scoring", sampling), ("training", training)) if need > 0.95 * total_gib]
    return line, over


def memory_plan_line(config: Config, total_gib: float) -> str:
    """The GPU memory plan of a worker with every role (gpu_memory_plan, above), with a warning when a phase
    would not fit."""
    from common.hub import local_model_dir

    student, teacher = (json.loads((local_model_dir(name) / "config.json").read_text())
                        for name in (config.model.student, config.model.teacher))
    line, over = gpu_memory_plan(config, student, teacher, total_gib)
    if over:
        line += (f"\nwarning: {'; '.join(over)} (fix: lower generate.gpu_memory_utilization, score.max_tokens_per_batch "
                 "or train.max_tokens_per_micro_batch, or give the teacher GPUs of its own: docs/recipe.md)")
    return line


def check_workers(client: Client, config: Config) -> str:
    """Every role has a worker and every worker can hold its models; else one line saying what to fix.
    Returns the description of the cluster printed at start: one line, and on GPUs the memory plan."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    fix = "start them with `python -m orchestrator workers --scheduler ...` (docs/recipe.md)"
    ranks = [train_role(rank) for rank in range(config.train.processes)]
    holders = {role: sorted(str(info.get("name", address)) for address, info in workers.items()
                            if role in info.get("resources", {})) for role in (GENERATE, SCORE, *ranks)}
    missing = [role for role, names in holders.items() if not names]
    if missing:
        raise ConfigError(f"config key 'cluster.address': no worker of {config.cluster.address} has the resource(s) "
                          f"{', '.join(missing)} (fix: {fix})")
    shared = {role: holders[role] for role in ranks if len(holders[role]) > 1}
    if shared:  # Dask would send each iteration's rank task to either: a trainer opened twice, its state split
        raise ConfigError("config key 'cluster.address': each training rank must live on one worker; "
                          + "; ".join(f"{role} is on {', '.join(names)}" for role, names in shared.items())
                          + " (fix: start each node's workers with its own --first-rank, docs/recipe.md)")
    limited = sorted(info.get("name", address) for address, info in workers.items() if info.get("memory_limit"))
    if limited:
        raise ConfigError(f"Dask worker(s) {', '.join(map(str, limited))} have a memory limit: Dask would pause them "
                          f"silently once their models outgrow it and the run would hang (fix: {fix}, or pass "
                          "`--memory-limit 0` to dask worker)")
    processes = client.run(_worker_process)
    daemonic = sorted(address for address, info in processes.items() if info["daemon"])
    if daemonic:
        raise ConfigError(f"Dask worker(s) {', '.join(daemonic)} are daemonic processes: vLLM's engine and the "
                          f"verifier's pool cannot start there (fix: {fix})")
    gpus = sorted({info["gpu"] for info in processes.values() if info["gpu"]})
    held = sum(1 for info in workers.values() for role in info.get("resources", {}) if role.startswith("train-rank-"))
    where = f"GPU(s) {','.join(gpus)}" if gpus else "CPU"
    line = (f"cluster: {len(workers)} worker(s) on {where}, {held} training rank(s) of {config.train.processes} "
            f"used; Dask memory management off (no pausing, spilling or terminating)")
    totals = [info["gpu_total_gib"] for info in processes.values() if info["gpu_total_gib"]]
    return line + (f"\n{memory_plan_line(config, min(totals))}" if totals else "")


def generation_workers(client: Client) -> int:
    """How many workers of the cluster sample (the `generate` role): the run's default shard count."""
    return sum(GENERATE in info.get("resources", {}) for info in client.scheduler_info(n_workers=-1)["workers"].values())


@contextmanager
def open_cluster(config: Config) -> Iterator[Client]:
    """A client whose every worker carries the Roles plugin; the cluster's workers close with it."""
    import dask

    with dask.config.set(WORKER_SETTINGS):
        if config.cluster.address:
            cluster, client = None, Client(config.cluster.address)
            controller = None  # on another machine: its workers outlive us by design
        else:
            cluster = SpecCluster(workers=embedded_workers(config), silence_logs=logging.ERROR, asynchronous=False,
                                  # Its HTTP server on a free local port: two runs at once must not race for 8787.
                                  scheduler={"cls": Scheduler, "options": {"dashboard": False, "host": "127.0.0.1",
                                                                           "dashboard_address": "127.0.0.1:0"}})
            client = Client(cluster)
            client.wait_for_workers(len(cluster.workers))
            controller = os.getpid()  # embedded workers exit when this process dies (a kill -9 included)
        try:
            print(check_workers(client, config), flush=True)
            client.register_plugin(Roles(controller))
            try:
                yield client
            finally:
                client.run(close_roles)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


# ---- `python -m orchestrator workers` -----------------------------------------------------------

def serve_workers(scheduler: str, specs: list[WorkerSpec]) -> None:
    """Start one worker per spec (each pinned to its GPU, with its roles) joined to `scheduler`, and
    keep them until SIGINT/SIGTERM or the scheduler goes away. Print one line per worker."""
    import dask

    threads = threads_per_worker(len(specs))
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the nannies' INFO lines are not news

    async def serve() -> None:
        # death_timeout: a scheduler that cannot be reached ends the command instead of a silent wait.
        nannies = [Nanny(scheduler, death_timeout=60, **nanny_options(spec, threads)) for spec in specs]
        try:
            await asyncio.gather(*nannies)
        except (OSError, RuntimeError, asyncio.TimeoutError) as error:
            raise ConfigError(f"no Dask scheduler answers at {scheduler} ({error}) (fix: start one "
                              "with `dask scheduler --port 8786` and pass its address)") from None
        for spec, nanny in zip(specs, nannies):
            roles = ",".join(sorted(spec.resources))
            print(f"worker {spec.name}: {nanny.worker_address} {'GPU ' + spec.gpu if spec.gpu else 'CPU'}, "
                  f"{threads} torch thread(s), roles {roles}, no memory limit", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        finished = asyncio.gather(*(nanny.finished() for nanny in nannies))
        await asyncio.wait([asyncio.ensure_future(stop.wait()), finished], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*(nanny.close(timeout=30) for nanny in nannies), return_exceptions=True)

    with dask.config.set(WORKER_SETTINGS):
        asyncio.run(serve())

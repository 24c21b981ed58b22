"""The train stage: scored shards of iteration i + checkpoint v_i -> checkpoint v_{i+1}.

`Trainer` is one rank's DeepSpeed engine. A local rank process (common/executors.py: LocalExecutor)
makes one for one iteration; a resident trainer (orchestrator.mode: resident) keeps it across
iterations, so the model, the optimizer state and DeepSpeed's set-up are not rebuilt each time. Both
write the same checkpoint: in memory the engine holds exactly what v_{i+1} holds on disk (weights,
Adam moments, step count, lr schedule), so continuing from memory and reloading from disk give the
same bytes.

The stage has two parts (stages/train/records.py): `train_policy` takes the optimizer steps and
writes v_{i+1}'s policy (what the next iteration samples from); `write_optimizer_state` writes the
optimizer state, which a resident trainer does while the next iteration samples. The driver seals
the folder (stages/train/records.py: seal_train).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import shards
from common.config import Config
from common.devices import peak_flops
from common.errors import ContractError, StalePolicyError
from common.faults import fault_point
from common.flops import forward_flops, mfu
from common.memory import peak_gpu_gib, peak_rss_gib, reset_peaks, rss_gib
from common.modeling import load_tokenizer
from common.seeds import minibatch_seed, train_seed
from common.shards import policy_version
from common.weights import bit_sum, checksums, file_tensors
from stages.train.engine import export_policy, init_distributed, open_engine, save_optimizer_state
from stages.train.iteration import iteration_data, scored_columns, train_iteration
from stages.train.records import PolicyWritten, StateWritten


def check_on_policy(table, version: str) -> None:
    """Strict on-policy guard: every row must have been sampled by exactly the policy being trained."""
    versions = set(table.column("policy_version").to_pylist())
    if versions != {version}:
        stale = sorted(versions - {version})
        raise StalePolicyError(f"refusing to train: rows sampled by {stale} but the trainer starts from {version}")


class Trainer:
    """One rank's engine, opened on v_i when first needed and kept while it follows the run.

    `lock` is held while the engine trains or writes its optimizer state: a resident trainer writes
    v_{i+1}'s state while its worker samples, and nothing may step, reload or close the engine then."""

    def __init__(self, config: Config, rank: int | None = None, world: int | None = None,
                 address: str | None = None):
        self.config = config
        self.rank, self.world = init_distributed(rank, world, address)
        self.engine = None
        self.tokenizer = None
        self.holds: str | None = None  # the policy version the engine's state equals, if any
        self.lock = threading.RLock()

    def engine_at(self, checkpoint: Path):
        """The engine holding `checkpoint`'s weights and optimizer state: the resident one when it
        holds that version already (it wrote it), else opened afresh from the files."""
        version = policy_version(checkpoint)
        if self.engine is None or self.holds != version:
            self.close()
            self.tokenizer = load_tokenizer(checkpoint)
            self.engine = open_engine(self.config, checkpoint)
            self.holds = version
        return self.engine

    def open_at(self, checkpoint: Path) -> None:
        """Open the engine on `checkpoint` ahead of its first iteration (a resident rank does it while the
        controller starts), verified first as _train_policy would: the optimizer state is a pickle."""
        with self.lock:
            if self.holds != policy_version(checkpoint):
                shards.verify_checkpoint(checkpoint)
                self.engine_at(checkpoint)

    def close(self) -> None:
        with self.lock:
            if self.engine is not None:
                self.engine.destroy()
            self.engine, self.holds = None, None


PROBE_ROWS, PROBE_RESPONSE_TOKENS = 4, 32


def probe_sequences(columns: dict) -> tuple[list[list[int]], list[list[int]]]:
    """The weight-sync probe's sequences: the first rows by (prompt_id, sample_idx), responses cut short."""
    rows = sorted(range(len(columns["prompt_id"])), key=lambda k: (columns["prompt_id"][k], columns["sample_idx"][k]))
    rows = rows[:PROBE_ROWS]
    return ([columns["prompt_ids"][k] for k in rows], [columns["response_ids"][k][:PROBE_RESPONSE_TOKENS] for k in rows])


def trainer_probe(trainer: Trainer, prompts: list[list[int]], responses: list[list[int]]) -> shards.Probe:
    """The trained weights' log-probs of the probe (a forward on every rank: ZeRO-3 gathers collectively)."""
    t = trainer.config.train
    with torch.no_grad():
        logprobs, _ = trainer.engine.module(prompts, responses, trainer.tokenizer.pad_token_id, t.logit_chunk_tokens,
                                            False)
    dtype = str(next(trainer.engine.module.parameters()).dtype).removeprefix("torch.")
    values = [piece.float().tolist() for piece in logprobs.split([len(r) for r in responses])]
    return shards.Probe(dtype, prompts, responses, values)


def write_policy(trainer: Trainer, target: Path, probe_rows: tuple[list[list[int]], list[list[int]]]) -> dict:
    """Write v_{i+1}'s policy (weights, tokenizer, weight-sync probe) beside its final name, seal it
    (POLICY, hashed once, here), then rename: readers never see half of it. Returns rank 0's timings
    and hashes ({} on the other ranks)."""
    rank = trainer.rank
    staging = target.with_name(f".{target.name}.tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
    dist.barrier()
    started = time.time()
    export_policy(trainer.engine, trainer.tokenizer, staging)
    probe = trainer_probe(trainer, *probe_rows)
    dist.barrier()
    written = {}
    if rank == 0:
        tensors = file_tensors(staging)  # what an engine will load: the gate checks its copy against these
        probe.checksums, probe.bit_sum = checksums(tensors), bit_sum(tensors.values())
        shards.write_probe(staging, probe)
        exported = time.time()
        files = shards.seal_policy(staging)
        written = {"train/export_seconds": exported - started, "train/policy_hash_seconds": time.time() - exported,
                   "files": files}
        fault_point("checkpoint")
        os.replace(staging, target)
    dist.barrier()
    return written


def train_policy(config: Config, run: Path, iteration: int, trainer: Trainer) -> PolicyWritten | None:
    """The steps of iteration i on this rank, then v_{i+1}'s policy written and sealed. Rank 0 returns
    its account; the other ranks, and every rank when iteration i is sealed already, return None.

    Raises ContractError (missing or altered inputs), StalePolicyError (rows of another
    policy) and NonFiniteError (nothing is written then).
    """
    with trainer.lock:
        return _train_policy(config, run, iteration, trainer)


@contextlib.contextmanager
def profiled(run: Path, iteration: int, rank: int, enabled: bool):
    """torch.profiler over the block when enabled (train.profile_iteration): a Chrome trace and the top-30
    operators by self time in <run>/profile/, outside the sealed stage folders."""
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        yield
    out = run / "profile"
    out.mkdir(exist_ok=True)
    profiler.export_chrome_trace(str(out / f"iter={iteration}-rank{rank}.json"))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / f"iter={iteration}-rank{rank}.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=30))
    print(f"profile: iteration {iteration}'s training -> {out}/iter={iteration}-rank{rank}.json", flush=True)


def _train_policy(config: Config, run: Path, iteration: int, trainer: Trainer) -> PolicyWritten | None:
    out_dir = shards.stage_dir(run, iteration, "train")
    if shards.stage_finished(out_dir):
        return None
    source, target = shards.checkpoint_dir(run, iteration), shards.checkpoint_dir(run, iteration + 1)
    version = policy_version(source)
    resident = trainer.holds == version  # the engine wrote v_i itself: no load, no DeepSpeed set-up
    verify_started = time.time()
    if not resident:  # the optimizer state is a pickle: load only what we wrote
        shards.verify_checkpoint(source)
    verify_seconds = time.time() - verify_started
    scored = shards.read_stage(shards.stage_dir(run, iteration, "scored"), "scored", scored_columns(config.train))
    check_on_policy(scored, version)
    data = iteration_data(scored, config.train)
    columns = scored.select(["prompt_id", "sample_idx"]).to_pydict() | {"prompt_ids": data.prompts,
                                                                        "response_ids": data.responses}
    started = time.time()
    if trainer.rank == 0:
        shards.reset_stage(out_dir)
    reset_peaks()
    engine = trainer.engine_at(source)
    setup_seconds = time.time() - started
    baseline_rss = rss_gib()  # the model, its gradients' buffers and the optimizer state, before any step
    torch.manual_seed(train_seed(config.seed, iteration))  # after any loading: the same stream resident or not
    train_started = time.time()
    with profiled(run, iteration, trainer.rank, config.train.profile_iteration == iteration):
        metrics = train_iteration(config, engine, data, columns["prompt_id"], trainer.tokenizer.pad_token_id,
                                  minibatch_seed(config.seed, iteration), iteration)
    metrics["train/step_seconds"] = time.time() - train_started  # lp_old and the optimizer steps
    metrics["train/tokens_per_s"] = metrics["train/response_tokens"] / max(metrics["train/step_seconds"], 1e-9)
    # Forward + backward (3 forwards) of every row, over the ranks' devices for the steps' time (lp_old excluded).
    model_flops = forward_flops(source, data.tokens())
    utilisation = mfu(None if model_flops is None else 3 * model_flops, metrics["train/step_seconds"], trainer.world,
                      peak_flops(config.cluster.peak_tflops))
    if utilisation is not None:
        metrics["train/mfu"] = utilisation
    metrics["train/ranks"] = trainer.world  # data-parallel ranks that took the steps
    metrics["train/setup_seconds"] = setup_seconds
    metrics["train/verify_seconds"] = verify_seconds
    metrics["train/resident_engine"] = float(resident)
    metrics["train/peak_gpu_gib"] = peak_gpu_gib()
    metrics["train/peak_rss_gib"] = peak_rss_gib()
    metrics["train/baseline_rss_gib"] = baseline_rss
    written = write_policy(trainer, target, probe_sequences(columns))
    trainer.holds = policy_version(target)
    if trainer.rank != 0:
        return None
    files = written.pop("files")
    metrics.update(written)
    metrics["train/stage_seconds"] = time.time() - started
    return PolicyWritten(iteration, started, len(columns["prompt_id"]), metrics, version, trainer.holds, str(target),
                         files)


def write_optimizer_state(config: Config, run: Path, iteration: int, trainer: Trainer,
                          policy_files: dict[str, dict] | None) -> StateWritten | None:
    """v_{i+1}'s optimizer state, from the engine that trained iteration i (collective), hashed by the
    ranks that wrote it; rank 0 then seals the whole checkpoint (DONE) and returns the timings."""
    target = shards.checkpoint_dir(run, iteration + 1)
    with trainer.lock:
        if trainer.holds != policy_version(target):
            raise ContractError(f"the trainer holds {trainer.holds}, not {target.name}: its optimizer state "
                                       "cannot be written")
        state_files, timings = save_optimizer_state(trainer.engine, target)
        if trainer.rank != 0:
            return None
        fault_point("state")  # v_{i+1} samples already; training it further needs this state
        shards.seal_checkpoint(target, {**(policy_files or {}), **state_files})
        return StateWritten(timings, time.time())

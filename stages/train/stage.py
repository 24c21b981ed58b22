"""The train stage: scored shards of iteration i + checkpoint v_i -> checkpoint v_{i+1}.

`Trainer` is one rank's DeepSpeed engine. A stage process (`python -m stages.train`) makes one for
one iteration; a resident trainer (orchestrator.mode: resident) keeps it across iterations, so the
model, the optimizer state and DeepSpeed's set-up are not rebuilt each time. Both write the same
checkpoint: in memory the engine holds exactly what v_{i+1} holds on disk (weights, Adam moments,
step count, lr schedule), so continuing from memory and reloading from disk give the same bytes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import shards
from common.config import Config
from common.faults import fault_point
from common.memory import peak_gpu_gib, peak_rss_gib, rss_gib
from common.modeling import load_tokenizer
from common.progress import stage_summary
from common.seeds import minibatch_seed, train_seed
from common.shards import policy_version
from stages.train.engine import OPTIMIZER_STATE, export_policy, init_distributed, open_engine
from stages.train.errors import StalePolicyError
from stages.train.iteration import iteration_data, scored_columns, train_iteration


def check_on_policy(table, version: str) -> None:
    """Strict on-policy guard: every row must have been sampled by exactly the policy being trained."""
    versions = set(table.column("policy_version").to_pylist())
    if versions != {version}:
        stale = sorted(versions - {version})
        raise StalePolicyError(f"refusing to train: rows sampled by {stale} but the trainer starts from {version}")


class Trainer:
    """One rank's engine, opened on v_i when first needed and kept while it follows the run."""

    def __init__(self, config: Config, rank: int | None = None, world: int | None = None,
                 address: str | None = None):
        self.config = config
        self.rank, self.world = init_distributed(rank, world, address)
        self.engine = None
        self.tokenizer = None
        self.holds: str | None = None  # the policy version the engine's state equals, if any

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

    def close(self) -> None:
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


def save_checkpoint(trainer: Trainer, target: Path, probe_rows: tuple[list[list[int]], list[list[int]]]) -> None:
    """Write v_{i+1} (weights, tokenizer, optimizer state, weight-sync probe) beside its final name,
    mark it DONE, then rename: readers never see half of it."""
    rank = trainer.rank
    staging = target.with_name(f".{target.name}.tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
    dist.barrier()
    export_policy(trainer.engine, trainer.tokenizer, staging)
    probe = trainer_probe(trainer, *probe_rows)
    dist.barrier()
    if rank == 0:
        shards.write_probe(staging, probe)
        shards.seal_checkpoint(staging)
        fault_point("checkpoint")
        os.replace(staging, target)
    dist.barrier()


def prune_checkpoints(run: Path, keep: tuple[Path, ...], keep_every: int) -> None:
    """Optimizer states are only needed to continue or redo training: keep the last two. With
    `keep_every` = N, older checkpoints survive only when their version is a multiple of N."""
    for checkpoint in sorted(Path(run, "checkpoints").glob("v[0-9]*")):
        if checkpoint in keep:
            continue
        if keep_every and int(checkpoint.name[1:]) % keep_every:
            shutil.rmtree(checkpoint, ignore_errors=True)
        else:
            shutil.rmtree(checkpoint / OPTIMIZER_STATE, ignore_errors=True)


def train_stage(config: Config, run: Path, iteration: int, trainer: Trainer) -> dict | None:
    """Train iteration i on this rank; rank 0 seals iter=i/train/. None when it was done already.

    Raises shards.ContractError (missing or altered inputs), StalePolicyError (rows of another
    policy) and NonFiniteError (nothing is written then).
    """
    out_dir = shards.stage_dir(run, iteration, "train")
    if shards.stage_finished(out_dir):
        return None
    source, target = shards.checkpoint_dir(run, iteration), shards.checkpoint_dir(run, iteration + 1)
    shards.verify_checkpoint(source)  # the optimizer state is a pickle: load only what we wrote
    scored = shards.read_stage(shards.stage_dir(run, iteration, "scored"), "scored", scored_columns(config.train))
    version = policy_version(source)
    check_on_policy(scored, version)
    data = iteration_data(scored, config.train)
    columns = scored.select(["prompt_id", "sample_idx"]).to_pydict() | {"prompt_ids": data.prompts,
                                                                        "response_ids": data.responses}
    started = time.time()
    if trainer.rank == 0:
        shards.reset_stage(out_dir)
    resident = trainer.holds == version  # the engine wrote v_i itself: no load, no DeepSpeed set-up
    engine = trainer.engine_at(source)
    setup_seconds = time.time() - started
    baseline_rss = rss_gib()  # the model, its gradients' buffers and the optimizer state, before any step
    torch.manual_seed(train_seed(config.seed, iteration))  # after any loading: the same stream resident or not
    train_started = time.time()
    metrics = train_iteration(config, engine, data, columns["prompt_id"], trainer.tokenizer.pad_token_id,
                              minibatch_seed(config.seed, iteration), iteration)
    metrics["train/step_seconds"] = time.time() - train_started  # lp_old and the optimizer steps
    metrics["train/tokens_per_s"] = metrics["train/response_tokens"] / max(metrics["train/step_seconds"], 1e-9)
    metrics["train/setup_seconds"] = setup_seconds
    metrics["train/resident_engine"] = float(resident)
    metrics["train/peak_gpu_gib"] = peak_gpu_gib()
    metrics["train/peak_rss_gib"] = peak_rss_gib()
    metrics["train/baseline_rss_gib"] = baseline_rss
    save_checkpoint(trainer, target, probe_sequences(columns))
    trainer.holds = policy_version(target)
    if trainer.rank != 0:
        return None
    produced = trainer.holds
    manifest = shards.write_manifest(out_dir, "train", iteration, started, metrics,
                                     {"policy_version": version, "produced_checkpoint": str(target),
                                      "produced_version": produced})
    prune_checkpoints(run, (source, target), config.train.keep_checkpoint_every)
    stage_summary("train", iteration, len(columns["prompt_id"]), int(metrics["train/response_tokens"]),
                  metrics["train/tokens_per_s"], manifest["seconds"],
                  f"{metrics['train/optimizer_steps']} steps, loss {metrics['train/loss']:.4f}, "
                  f"grad norm {metrics['train/grad_norm']:.3f} -> {produced}")
    return manifest

"""What the train stage hands whoever seals its folder, and the sealing itself (torch-free: the resident
controller seals iter=i/train/ without loading what the trainer runs on).

A train stage writes v_{i+1} in two parts. The policy part (weights, tokenizer, weight-sync probe,
sealed by POLICY) is what the next iteration samples from, so it is on the critical path. The
optimizer state (needed only to continue training, and the bulk of the bytes: ~20 GB at 1.7B with
fp32 Adam moments and master weights) follows, and in resident mode it is written while the next
iteration samples. The iteration counts as trained only once both are sealed (DONE, then the train
manifest): a crash in between leaves v_{i+1} without DONE, and the next `make iterate` trains
iteration i again from v_i, whose optimizer state is kept until then.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from common import shards
from common.config import Config
from common.errors import ContractError
from common.progress import stage_summary

OPTIMIZER_STATE = "optimizer_state"


@dataclass
class PolicyWritten:
    """Rank 0's account of the first part: the steps taken and v_{i+1}'s policy sealed."""
    iteration: int
    started: float                  # the stage's clock starts here (inputs read, before any load)
    rows: int
    metrics: dict[str, float]       # train/... of the steps and the policy's export
    policy_version: str             # v_i, what the rows were sampled by
    produced_version: str           # v_{i+1}
    checkpoint: str                 # v_{i+1}'s folder
    policy_files: dict[str, dict] = field(default_factory=dict)  # POLICY's hashes, taken by the writer


@dataclass
class StateWritten:
    """The second part: the optimizer state written and hashed by the ranks that wrote it."""
    metrics: dict[str, float]       # train/state_write_seconds, train/state_hash_seconds
    finished: float                 # when DONE was written: the stage's output is whole from then


def announce(policy: PolicyWritten) -> None:
    """The train stage's line, printed as soon as the new policy exists."""
    m = policy.metrics
    stage_summary("train", policy.iteration, policy.rows, int(m["train/response_tokens"]), m["train/tokens_per_s"],
                  m["train/stage_seconds"], f"{m['train/optimizer_steps']:.0f} steps, loss {m['train/loss']:.4f}, "
                  f"grad norm {m['train/grad_norm']:.3f} -> {policy.produced_version}")


def seal_train(config: Config, run: Path, policy: PolicyWritten, state: StateWritten) -> dict:
    """Write iter=i/train/_MANIFEST.json once v_{i+1} is whole (DONE), then prune older optimizer states."""
    iteration = policy.iteration
    target = Path(policy.checkpoint)
    if not shards.checkpoint_ready(target):
        raise ContractError(f"{target} has no DONE: its optimizer state was not sealed")
    manifest = shards.write_manifest(shards.stage_dir(run, iteration, "train"), "train", iteration, policy.started,
                                     {**policy.metrics, **state.metrics},
                                     {"policy_version": policy.policy_version, "produced_checkpoint": str(target),
                                      "produced_version": policy.produced_version}, finished=state.finished)
    prune_checkpoints(run, (shards.checkpoint_dir(run, iteration), target), config.train.keep_checkpoint_every)
    return manifest


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

"""The train stage, driven and sealed: what a driver (the controller, `python -m stages.train`) runs,
without loading what the trainer runs on (no model library is imported here).

`submit_training` sends one `train_task` per rank (stages/train/tasks.py) to an executor
(common/executors.py); `collect_training` gathers rank 0's account of the steps and the new policy,
then sends each rank its `optimizer_state_task`; `seal_training` waits for those and seals
iter=i/train/.

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
from common.devices import train_role
from common.errors import ContractError
from common.executors import Executor, Task
from common.progress import stage_summary

OPTIMIZER_STATE = "optimizer_state"
TRAIN = "train"
TRAIN_RANK = Task("stages.train.tasks", "train_task")
WRITE_STATE = Task("stages.train.tasks", "optimizer_state_task")


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


def seal_train(config: Config, run: Path, policy: PolicyWritten, state: StateWritten) -> shards.Manifest:
    """Write iter=i/train/_MANIFEST.json once v_{i+1} is whole (DONE), then prune older optimizer states."""
    iteration = policy.iteration
    target = Path(policy.checkpoint)
    if not shards.checkpoint_ready(target):
        raise ContractError(f"{target} has no DONE: its optimizer state was not sealed")
    manifest = shards.write_manifest(shards.stage_dir(run, iteration, "train"), "train", iteration, policy.started,
                                     {**policy.metrics, **state.metrics}, state.finished,
                                     policy_version=policy.policy_version, produced_checkpoint=str(target),
                                     produced_version=policy.produced_version)
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


# ---- the driver -----------------------------------------------------------------------------

@dataclass
class Saving:
    """v_{i+1}'s optimizer state being written by every rank (after its policy)."""
    policy: PolicyWritten
    handles: list


def submit_training(executor: Executor, config: Config, run: Path, iteration: int) -> list | None:
    """One train task per rank (they meet at the executor's rendezvous); None when iteration i is trained."""
    if shards.stage_finished(shards.stage_dir(run, iteration, "train")):
        return None
    world, address = config.train.processes, executor.rendezvous()
    return [executor.submit(TRAIN_RANK, run, iteration, rank, world, address, role=train_role(rank))
            for rank in range(world)]


def collect_training(executor: Executor, config: Config, run: Path, iteration: int, ranks: list | None
                     ) -> Saving | None:
    """Wait for the steps and v_{i+1}'s policy (announced at once), then send every rank its optimizer
    state write: a resident worker writes it while the next iteration samples."""
    if ranks is None:
        return None
    policy = executor.gather(TRAIN, iteration, ranks)[0]
    if policy is None:  # sealed meanwhile by another process
        return None
    announce(policy)
    handles = [executor.submit(WRITE_STATE, run, iteration, rank, policy.policy_files if rank == 0 else None,
                               role=train_role(rank)) for rank in range(config.train.processes)]
    return Saving(policy, handles)


def seal_training(executor: Executor, config: Config, run: Path, saving: Saving) -> shards.Manifest:
    """Wait for v_{i+1}'s optimizer state (sealed DONE by rank 0), then seal iter=i/train/."""
    state = executor.gather(TRAIN, saving.policy.iteration, saving.handles)[0]
    return seal_train(config, run, saving.policy, state)

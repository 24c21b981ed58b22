"""Train stage: one iteration of on-policy distillation with DeepSpeed -> checkpoint v_{i+1}.

    python -m stages.train --run runs/tiny --iter 3
    deepspeed --num_gpus 2 --no_local_rank --module stages.train --run runs/tiny --iter 3   # data parallel

Starts from checkpoint v_i (and its optimizer state), refuses any scored row whose policy_version is
not v_i, recomputes lp_old without grad, then takes one optimizer step per mini-batch with the loss
of stages/train/loss.py, token-averaged over the whole mini-batch whatever the rank and micro-batch
split. A non-finite loss or gradient aborts the iteration before any checkpoint is written.
Writes v_{i+1} as HF safetensors + tokenizer (ZeRO-3 weights consolidated first).
"""
from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common import shards
from common.config import Config, ConfigError, TrainConfig
from common.faults import fault_point
from common.modeling import load_model, load_tokenizer, peak_gpu_gib, policy_version, response_logprobs
from common.progress import Progress, stage_summary
from common.run import fail, free_port, load_run_config, quiet_libraries, set_threads, stage_arguments
from stages.train.batching import micro_batches, minibatches, rank_share
from stages.train.loss import LossConfig, TokenBatch, distillation_loss, grpo_advantages, truncated_is_weights

OPTIMIZER_STATE = "optimizer_state"


class StalePolicyError(RuntimeError):
    pass


class NonFiniteError(RuntimeError):
    pass


def check_on_policy(table, version: str) -> None:
    """Strict on-policy guard: every row must have been sampled by exactly the policy being trained."""
    versions = set(table.column("policy_version").to_pylist())
    if versions != {version}:
        stale = sorted(versions - {version})
        raise StalePolicyError(f"refusing to train: rows sampled by {stale} but the trainer starts from {version}")


# ---- the data of one iteration ------------------------------------------------------------

@dataclass
class IterationData:
    """Per-row inputs of the loss, built once from the scored shard (row order kept)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    teacher: list[torch.Tensor]
    rollout: list[torch.Tensor]
    task_advantages: list[float] | None = None
    topk_ids: list | None = None                    # ids at which the loss compares the two models
    teacher_at_topk: list[torch.Tensor] | None = None
    old: list[torch.Tensor | None] | None = None     # lp_old, filled for this rank's rows

    def tokens(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]


def iteration_data(columns: dict, t: TrainConfig) -> IterationData:
    floats = lambda rows: [torch.tensor(v, dtype=torch.float32) for v in rows]  # noqa: E731
    data = IterationData(columns["prompt_ids"], columns["response_ids"], floats(columns["teacher_logprobs"]),
                         floats(columns["rollout_logprobs"]))
    if t.use_task_rewards:
        data.task_advantages = grpo_advantages(columns["reward"], columns["prompt_id"])
    # forward_kl_topk compares on the teacher's top-k; reverse_kl_topk on the student's sampling top-k.
    topk_columns = {"forward_kl_topk": ("teacher_topk_ids", "teacher_topk_logprobs"),
                    "reverse_kl_topk": ("student_topk_ids", "teacher_student_topk_logprobs")}.get(t.loss)
    if topk_columns:
        ids, teacher = topk_columns
        if ids not in columns or teacher not in columns:
            raise ConfigError(f"train.loss: '{t.loss}' needs the scored columns {ids} and {teacher}, "
                              "which this iteration's shards lack")
        data.topk_ids, data.teacher_at_topk = columns[ids], floats(columns[teacher])
    return data


# ---- DeepSpeed ------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    import deepspeed

    if "RANK" not in os.environ:  # a single local process; the DeepSpeed launcher sets these itself
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(t: TrainConfig) -> dict:
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export needs whole tensors
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # We own accumulation: micro-batches vary in number, and step() is the mini-batch boundary.
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.bf16 and torch.cuda.is_available()},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(config: Config, model: torch.nn.Module):
    import deepspeed

    t = config.train
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.offload_optimizer:  # the optimizer step then runs on the CPU: use DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                     adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    warmup = max(t.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(t))
    return engine


# ---- the iteration ------------------------------------------------------------------------

def micro_batch_loss(model, data: IterationData, rows: list[int], normaliser: float, t: TrainConfig,
                     loss_config: LossConfig, pad_id: int):
    """Forward the rows (packed or padded) and return their share of the mini-batch loss."""
    out = response_logprobs(model, [data.prompts[k] for k in rows], [data.responses[k] for k in rows], pad_id,
                            t.logit_chunk_tokens, packed=t.packing,
                            at_ids=None if data.topk_ids is None else [data.topk_ids[k] for k in rows])
    device = out.sampled[0].device
    cat = lambda pieces: torch.cat(pieces).to(device)  # noqa: E731
    old = cat([data.old[k] for k in rows])
    batch = TokenBatch(logprobs=torch.cat(out.sampled), old_logprobs=old, teacher_logprobs=cat([data.teacher[k] for k in rows]))
    if t.tis:
        batch.weights = truncated_is_weights(old, cat([data.rollout[k] for k in rows]), t.tis_cap)
    if data.task_advantages is not None:
        batch.task_advantages = cat([torch.full((len(data.responses[k]),), data.task_advantages[k]) for k in rows])
    if data.topk_ids is not None:
        batch.student_at_ids, batch.teacher_at_ids = torch.cat(out.at_ids), cat([data.teacher_at_topk[k] for k in rows])
    return distillation_loss(batch, normaliser, loss_config)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def padded_schedule(batches: list[list[int]], filler: list[int]) -> list[tuple[list[int], bool]]:
    """Every rank runs the same number of forward/backward passes (ZeRO-3 gathers parameters
    collectively in each forward): ranks with fewer micro-batches run `filler` with a zero loss."""
    count = torch.tensor([len(batches)])
    if rank_and_world()[1] > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return [(b, True) for b in batches] + [(filler, False)] * (int(count) - len(batches))


def recompute_old_logprobs(engine, data: IterationData, rows: list[int], t: TrainConfig, pad_id: int,
                           filler: list[int]) -> None:
    """lp_old: the trainer's own log-probs before any update; the PPO ratio is taken against these."""
    data.old = [None] * len(data.prompts)
    tokens = data.tokens()
    with torch.no_grad():
        for batch, real in padded_schedule(micro_batches(rows, tokens, t.max_tokens_per_micro_batch,
                                                         t.micro_batch_size), filler):
            out = response_logprobs(engine.module, [data.prompts[k] for k in batch], [data.responses[k] for k in batch],
                                    pad_id, t.logit_chunk_tokens, packed=t.packing)
            for k, values in zip(batch, out.sampled if real else []):
                data.old[k] = values.float().cpu()


def minibatch_backward(engine, data: IterationData, rows: list[int], normaliser: float, t: TrainConfig,
                       loss_config: LossConfig, pad_id: int, filler: list[int], where: str) -> dict:
    """Forward/backward over this rank's micro-batches of one mini-batch; gradients accumulate."""
    stats: dict = defaultdict(float)
    schedule = padded_schedule(micro_batches(rows, data.tokens(), t.max_tokens_per_micro_batch, t.micro_batch_size),
                               filler)
    for index, (batch, real) in enumerate(schedule):
        if not real:  # keeps collective calls in step with the other ranks; contributes nothing
            out = response_logprobs(engine.module, [data.prompts[k] for k in batch],
                                    [data.responses[k] for k in batch], pad_id, t.logit_chunk_tokens, packed=t.packing)
            engine.backward(torch.cat(out.sampled).sum() * 0.0, scale_wrt_gas=False)
            continue
        out = micro_batch_loss(engine.module, data, batch, normaliser, t, loss_config, pad_id)
        if not torch.isfinite(out.loss):
            raise NonFiniteError(f"{where}, micro-batch {index} (rows {batch[:8]}{'...' if len(batch) > 8 else ''}): "
                                 f"non-finite loss {out.loss.item()}")
        engine.backward(out.loss, scale_wrt_gas=False)
        stats["loss"] += out.loss.item()
        stats["clipped"] += out.clipped_tokens
        stats["reverse_kl"] += out.reverse_kl_sum
        stats["tokens"] += sum(len(data.responses[k]) for k in batch)
    return stats


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def train_iteration(config: Config, engine, data: IterationData, prompt_ids: list[str], pad_id: int, seed: int,
                    iteration: int) -> dict:
    t = config.train
    loss_config = LossConfig(mode=t.loss, kl_clamp=t.kl_clamp, clip_ratio=t.clip_ratio, dual_clip=t.dual_clip,
                             use_task_rewards=t.use_task_rewards, distill_coef=t.distill_coef)
    rank, world = rank_and_world()
    tokens = data.tokens()
    filler = [min(range(len(tokens)), key=lambda k: tokens[k])]
    steps = minibatches(prompt_ids, t.mini_batch_prompts, seed)
    shares = [rank_share(rows, tokens, world, rank) for rows in steps]

    recompute_old_logprobs(engine, data, [k for share in shares for k in share], t, pad_id, filler)
    mine = [k for share in shares for k in share]
    gap = torch.cat([data.old[k] - data.rollout[k] for k in mine]) if mine else torch.zeros(0)
    # k3 of the sampler/trainer gap: E[exp(r) - r - 1] with r = lp_rollout - lp_old, >= 0 and 0 iff equal.
    gap_k3 = (torch.exp(-gap) + gap - 1.0).sum().item()
    gap_sum, gap_count, gap_k3 = _all_reduce([gap.abs().sum().item(), gap.numel(), gap_k3])
    (gap_max,) = _all_reduce([gap.abs().max().item() if gap.numel() else 0.0], dist.ReduceOp.MAX)

    totals = defaultdict(float)
    bar = Progress(len(tokens), "train") if rank == 0 else None
    for step, (rows, share) in enumerate(zip(steps, shares)):
        minibatch_tokens = sum(len(data.responses[k]) for k in rows)
        where = f"iteration {iteration}, mini-batch {step}"
        # DeepSpeed averages gradients over ranks: normalise by the per-rank share of the global token count.
        stats = minibatch_backward(engine, data, share, minibatch_tokens / world, t, loss_config, pad_id, filler, where)
        # ZeRO stages 1-3 report the pre-clip norm after step(); stage 0 does not, so measure it here.
        stage0_norm = None if t.zero_stage else torch.nn.utils.get_total_norm(
            [p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()
        fault_point("train_step")
        grad_norm = float(engine.get_global_grad_norm() if stage0_norm is None else stage0_norm)
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise NonFiniteError(f"{where}: non-finite gradient norm {grad_norm}")
        loss, clipped, reverse_kl, step_tokens = _all_reduce([stats["loss"], stats["clipped"], stats["reverse_kl"],
                                                              stats["tokens"]])
        totals["loss"] += loss / world  # each rank's loss carries a factor `world` (see the normaliser)
        totals["clipped"] += clipped
        totals["reverse_kl"] += reverse_kl
        totals["tokens"] += step_tokens
        totals["grad_norm"] += grad_norm
        if bar is not None:
            bar.update(len(rows), int(step_tokens))
    if bar is not None:
        bar.close()
    return {
        "train/loss": totals["loss"] / len(steps),
        "train/grad_norm": totals["grad_norm"] / len(steps),
        "train/clip_fraction": totals["clipped"] / totals["tokens"],
        "train/reverse_kl": totals["reverse_kl"] / totals["tokens"],
        "train/logprob_gap_mean": gap_sum / max(gap_count, 1),
        "train/logprob_gap_max": gap_max,
        "train/logprob_gap_k3": gap_k3 / max(gap_count, 1),
        "train/optimizer_steps": len(steps),
        "train/lr": engine.get_lr()[0],
        "train/response_tokens": totals["tokens"],
    }


# ---- export -------------------------------------------------------------------------------

def save_checkpoint(engine, tokenizer, target: Path, zero_stage: int) -> None:
    """Write v_{i+1} beside its final name, mark it DONE, then rename: readers never see half of it."""
    rank = dist.get_rank()
    staging = target.with_name(f".{target.name}.tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
    dist.barrier()
    # ZeRO-3 holds a shard of each tensor per rank: gather whole tensors (collective) before export.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        engine.module.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    engine.save_checkpoint(str(staging / OPTIMIZER_STATE), tag="state")  # collective: every rank writes its part
    dist.barrier()
    if rank == 0:
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


def main() -> None:
    args = stage_arguments(__doc__).parse_args()
    quiet_libraries()
    run, iteration = args.run, args.iteration
    try:
        config = load_run_config(run)
        out_dir = shards.stage_dir(run, iteration, "train")
        if shards.stage_finished(out_dir):
            return
        source, target = shards.checkpoint_dir(run, iteration), shards.checkpoint_dir(run, iteration + 1)
        shards.verify_checkpoint(source)  # the optimizer state is a pickle: load only what we wrote
        scored = shards.read_stage(shards.stage_dir(run, iteration, "scored"), "scored")
        version = policy_version(source)
        check_on_policy(scored, version)
        columns = scored.to_pydict()
        data = iteration_data(columns, config.train)
    except (ConfigError, shards.ContractError, StalePolicyError) as error:
        fail(str(error))
    set_threads(config)
    started = time.time()
    torch.manual_seed(config.seed * 100_003 + iteration)
    rank, _ = init_distributed()
    if rank == 0:
        shards.reset_stage(out_dir)
    tokenizer, model = load_tokenizer(source), load_model(source)
    model.train()
    engine = deepspeed_engine(config, model)
    if (source / OPTIMIZER_STATE).exists():
        engine.load_checkpoint(str(source / OPTIMIZER_STATE), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    setup_seconds = time.time() - started
    train_started = time.time()
    try:
        metrics = train_iteration(config, engine, data, columns["prompt_id"], tokenizer.pad_token_id,
                                  config.seed * 7 + iteration, iteration)
    except NonFiniteError as error:
        fail(f"{error}; no checkpoint written (check the scored shard's teacher_logprobs and train.lr)")
    metrics["train/tokens_per_s"] = metrics["train/response_tokens"] / max(time.time() - train_started, 1e-9)
    metrics["train/setup_seconds"] = setup_seconds
    metrics["train/peak_gpu_gib"] = peak_gpu_gib()
    save_checkpoint(engine, tokenizer, target, config.train.zero_stage)
    if rank != 0:
        return
    produced = policy_version(target)
    manifest = shards.write_manifest(out_dir, "train", iteration, config.hash(), started, metrics,
                                     {"policy_version": version, "produced_checkpoint": str(target),
                                      "produced_version": produced})
    prune_checkpoints(run, (source, target), config.train.keep_checkpoint_every)
    stage_summary("train", iteration, len(columns["prompt_id"]), int(metrics["train/response_tokens"]),
                  metrics["train/tokens_per_s"], manifest["seconds"],
                  f"{metrics['train/optimizer_steps']} steps, loss {metrics['train/loss']:.4f}, "
                  f"grad norm {metrics['train/grad_norm']:.3f} -> {produced}")


if __name__ == "__main__":
    main()

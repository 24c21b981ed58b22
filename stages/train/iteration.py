"""One iteration of training on one rank: lp_old, then one optimizer step per mini-batch.

lp_old is v_i's own log-probs of the sampled tokens, recomputed without grad before the first step
when the loss reads it (the PPO ratio of k1 and of task rewards, truncated IS weights), or the
sampler's log-probs from the shard with `train.old_logprobs: rollout` (no forward). A direct loss
(k2, k3, abs, the top-k KLs) never does: it costs no forward beyond its steps, and the first
mini-batch's forward, taken before any step, gives lp_old of its rows for the sampler/trainer gap.

The loss (stages/train/loss.py) is a token mean over the global mini-batch whatever the split:
each rank normalises its micro-batches by the global token count / world size (DeepSpeed averages
gradients over ranks), and gradients accumulate over micro-batches until `engine.step()`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import torch
import torch.distributed as dist

from common.batching import micro_batches
from common.config import POLICY_GRADIENT_LOSSES, TOPK_LOSSES, Config, TrainConfig
from common.errors import ConfigError, ContractError, NonFiniteError
from common.faults import fault_point
from common.progress import Progress
from stages.train.batching import minibatches, rank_share
from stages.train.engine import all_reduce, rank_and_world
from stages.train.loss import LossConfig, TokenBatch, distillation_loss, grpo_advantages, truncated_is_weights


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
    old: list[torch.Tensor | None] | None = None     # lp_old per row, None where not (yet) known
    own: list[torch.Tensor | None] | None = None     # v_i's own forward per row where taken (the gap metrics)

    def tokens(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]


def scored_columns(t: TrainConfig) -> list[str]:
    """The scored columns the train stage reads: the top-k pair only for a top-k loss, never the
    student's sampling-time top-k log-probs or the response text."""
    columns = ["prompt_id", "sample_idx", "policy_version", "prompt_ids", "response_ids", "teacher_logprobs",
               "rollout_logprobs", "reward"]
    return columns + list(_topk_columns(t) or ())


def _topk_columns(t: TrainConfig) -> tuple[str, str] | None:
    """(ids, teacher log-probs at them): the teacher's top-k for forward_kl_topk*, the student's
    sampling-time top-k for reverse_kl_topk and vopd."""
    side = TOPK_LOSSES.get(t.loss)
    if side is None:
        return None
    return ("teacher_topk_ids", "teacher_topk_logprobs") if side == "teacher" else (
        "student_topk_ids", "teacher_student_topk_logprobs")


def row_tensors(table: pa.Table, name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """A list<T> or list<list<T>> column as one tensor per row ([tokens] or [tokens, k]), straight
    from Arrow's buffers: through Python lists a top-k column at k = 332 cost ~0.5 s per iteration."""
    array = table.column(name).combine_chunks()
    values = array.flatten()
    if pa.types.is_list(values.type):  # [tokens][k]: every token has the same k
        widths = values.value_lengths().to_numpy(zero_copy_only=False)
        k = int(widths[0]) if len(widths) else 0
        if (widths != k).any():
            raise ContractError(f"scored column '{name}' has tokens of unequal top-k width")
        flat = torch.tensor(values.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(widths), k)
    else:
        flat = torch.tensor(values.to_numpy(zero_copy_only=False), dtype=dtype)
    return list(flat.split(array.value_lengths().to_numpy(zero_copy_only=False).tolist()))


def iteration_data(scored: pa.Table, t: TrainConfig) -> IterationData:
    """The loss's inputs from the scored table: token ids as lists (packing builds from them), log-probs
    and top-k columns as tensors."""
    data = IterationData(scored.column("prompt_ids").to_pylist(), scored.column("response_ids").to_pylist(),
                         row_tensors(scored, "teacher_logprobs", torch.float32),
                         row_tensors(scored, "rollout_logprobs", torch.float32))
    if t.use_task_rewards:
        data.task_advantages = grpo_advantages(scored.column("reward").to_pylist(),
                                               scored.column("prompt_id").to_pylist())
    topk = _topk_columns(t)
    if topk:
        ids, teacher = topk
        if ids not in scored.schema.names or teacher not in scored.schema.names:
            raise ConfigError(f"train.loss: '{t.loss}' needs the scored columns {ids} and {teacher}, "
                              "which this iteration's shards lack")
        data.topk_ids = row_tensors(scored, ids, torch.long)
        data.teacher_at_topk = row_tensors(scored, teacher, torch.float32)
    return data


def loss_config(t: TrainConfig) -> LossConfig:
    return LossConfig(mode=t.loss, loss_max_clamp=t.loss_max_clamp, log_prob_min_clamp=t.log_prob_min_clamp,
                      clip_ratio=t.clip_ratio, dual_clip=t.dual_clip, use_task_rewards=t.use_task_rewards,
                      distill_coef=t.distill_coef, power_alpha=t.power_alpha)


def forward(engine, data: IterationData, rows: list[int], t: TrainConfig, pad_id: int, with_topk: bool = True):
    """The engine's forward over `rows` (packed or padded): flat log-probs, and at the top-k ids."""
    at_ids = [data.topk_ids[k] for k in rows] if with_topk and data.topk_ids is not None else None
    return engine([data.prompts[k] for k in rows], [data.responses[k] for k in rows], pad_id, t.logit_chunk_tokens,
                  t.packing, at_ids)


def needs_old_logprobs(t: TrainConfig) -> bool:
    """Whether the loss reads lp_old: the PPO ratio (k1, vopd, poweropd, task rewards) or truncated IS weights."""
    return t.loss in POLICY_GRADIENT_LOSSES or t.use_task_rewards or t.tis


def keep_old_logprobs(data: IterationData, rows: list[int], logprobs: torch.Tensor) -> None:
    """Store a forward of v_i, flat over `rows`' response tokens, as lp_old of the rows that lack it
    (and as v_i's own log-probs, which the sampler/trainer gap is measured on)."""
    if data.own is None:
        data.own = [None] * len(data.responses)
    for k, values in zip(rows, logprobs.detach().split([len(data.responses[k]) for k in rows])):
        if data.own[k] is None:
            data.own[k] = values.float().cpu()
        if data.old[k] is None:
            data.old[k] = data.own[k]


def micro_batch_loss(engine, data: IterationData, rows: list[int], normaliser: float, t: TrainConfig,
                     config: LossConfig, pad_id: int, before_any_step: bool = False):
    """Forward the rows through the engine and return their share of the mini-batch loss.
    `before_any_step`: the engine still holds v_i, so this forward is lp_old for rows that lack it."""
    logprobs, at_ids = forward(engine, data, rows, t, pad_id)
    device = logprobs.device
    cat = lambda pieces: torch.cat(pieces).to(device)  # noqa: E731
    if before_any_step:
        keep_old_logprobs(data, rows, logprobs)
    old = cat([data.old[k] for k in rows]) if all(data.old[k] is not None for k in rows) else None
    if old is None and needs_old_logprobs(t):  # a ratio against an already updated policy would be wrong
        raise RuntimeError(f"rows {rows[:8]} have no lp_old (a bug: train_iteration recomputes it for every "
                           "row when the loss reads it)")
    batch = TokenBatch(logprobs=logprobs, old_logprobs=old, teacher_logprobs=cat([data.teacher[k] for k in rows]))
    if t.tis:
        batch.weights = truncated_is_weights(old, cat([data.rollout[k] for k in rows]), t.tis_cap)
    if data.task_advantages is not None:
        batch.task_advantages = cat([torch.full((len(data.responses[k]),), data.task_advantages[k]) for k in rows])
    if data.topk_ids is not None:
        batch.student_at_ids, batch.teacher_at_ids = at_ids, cat([data.teacher_at_topk[k] for k in rows])
    return distillation_loss(batch, normaliser, config)


def padded_schedule(batches: list[list[int]], filler: list[int]) -> list[tuple[list[int], bool]]:
    """Every rank runs the same number of forward/backward passes (ZeRO-3 gathers parameters
    collectively in each forward): ranks with fewer micro-batches run `filler` with a zero loss."""
    (count,) = all_reduce([len(batches)], dist.ReduceOp.MAX)
    return [(b, True) for b in batches] + [(filler, False)] * (int(count) - len(batches))


def recompute_old_logprobs(engine, data: IterationData, rows: list[int], t: TrainConfig, pad_id: int,
                           filler: list[int]) -> None:
    """lp_old of `rows`: the trainer's own log-probs before any update; the PPO ratio is taken against
    these. No gradient, so the forward may bypass the engine (nothing to accumulate)."""
    with torch.no_grad():
        for batch, real in padded_schedule(micro_batches(rows, data.tokens(), t.max_tokens_per_micro_batch,
                                                         t.micro_batch_size), filler):
            logprobs, _ = forward(engine.module, data, batch, t, pad_id, with_topk=False)
            if real:
                keep_old_logprobs(data, batch, logprobs)


def minibatch_backward(engine, data: IterationData, rows: list[int], normaliser: float, t: TrainConfig,
                       config: LossConfig, pad_id: int, filler: list[int], where: str,
                       before_any_step: bool = False) -> dict:
    """Forward/backward over this rank's micro-batches of one mini-batch; gradients accumulate."""
    stats: dict = defaultdict(float)
    schedule = padded_schedule(micro_batches(rows, data.tokens(), t.max_tokens_per_micro_batch, t.micro_batch_size),
                               filler)
    for index, (batch, real) in enumerate(schedule):
        if not real:  # keeps collective calls in step with the other ranks; contributes nothing
            logprobs, _ = forward(engine, data, batch, t, pad_id, with_topk=False)
            engine.backward(logprobs.sum() * 0.0, scale_wrt_gas=False)
            continue
        out = micro_batch_loss(engine, data, batch, normaliser, t, config, pad_id, before_any_step)
        if not torch.isfinite(out.loss):
            raise NonFiniteError(f"{where}, micro-batch {index} (rows {batch[:8]}{'...' if len(batch) > 8 else ''}): "
                                 f"non-finite loss {out.loss.item()}")
        engine.backward(out.loss, scale_wrt_gas=False)
        stats["loss"] += out.loss.item()
        stats["clipped"] += out.clipped_tokens
        stats["dual_clipped"] += out.dual_clipped_tokens
        stats["reverse_kl"] += out.reverse_kl_sum
        stats["tokens"] += sum(len(data.responses[k]) for k in batch)
        stats["micro_batches"] += 1
    return stats


def train_iteration(config: Config, engine, data: IterationData, prompt_ids: list[str], pad_id: int, seed: int,
                    iteration: int) -> dict:
    """lp_old, then one optimizer step per mini-batch; returns the iteration's `train/...` metrics."""
    t = config.train
    losses = loss_config(t)
    rank, world = rank_and_world()
    tokens = data.tokens()
    filler = [min(range(len(tokens)), key=lambda k: tokens[k])]
    steps = minibatches(prompt_ids, t.mini_batch_prompts, seed)
    shares = [rank_share(rows, tokens, world, rank) for rows in steps]

    mine = [k for share in shares for k in share]
    data.old = [None] * len(data.prompts)
    data.own = [None] * len(data.prompts)
    if needs_old_logprobs(t) and t.old_logprobs == "rollout":
        data.old = list(data.rollout)  # the sampler's log-probs of v_i: no forward (see TrainConfig.old_logprobs)
    elif needs_old_logprobs(t):
        recompute_old_logprobs(engine, data, mine, t, pad_id, filler)

    totals = defaultdict(float)
    bar = Progress(len(tokens), "train") if rank == 0 else None
    for step, (rows, share) in enumerate(zip(steps, shares)):
        minibatch_tokens = sum(len(data.responses[k]) for k in rows)
        where = f"iteration {iteration}, mini-batch {step}"
        # DeepSpeed averages gradients over ranks: normalise by the per-rank share of the global token count.
        stats = minibatch_backward(engine, data, share, minibatch_tokens / world, t, losses, pad_id, filler, where,
                                   before_any_step=step == 0)
        # ZeRO stages 1-3 report the pre-clip norm after step(); stage 0 (one rank only) does not.
        stage0_norm = None if t.zero_stage else torch.nn.utils.get_total_norm(
            [p.grad for p in engine.module.parameters() if p.grad is not None])
        engine.step()
        fault_point("train_step")
        grad_norm = float(engine.get_global_grad_norm() if stage0_norm is None else stage0_norm)
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise NonFiniteError(f"{where}: non-finite gradient norm {grad_norm}")
        loss, clipped, dual_clipped, reverse_kl, step_tokens, micro = all_reduce(
            [stats["loss"], stats["clipped"], stats["dual_clipped"], stats["reverse_kl"], stats["tokens"],
             stats["micro_batches"]])
        totals["loss"] += loss / world  # each rank's loss carries a factor `world` (see the normaliser)
        totals["clipped"] += clipped
        totals["dual_clipped"] += dual_clipped
        totals["reverse_kl"] += reverse_kl
        totals["tokens"] += step_tokens
        totals["grad_norm"] += grad_norm
        totals["micro_batches"] += micro
        if bar is not None:
            bar.update(len(rows), int(step_tokens))
    if bar is not None:
        bar.close()
    # The sampler/trainer gap on the rows v_i's own forward saw (every row, or the first mini-batch's).
    known = [k for k in mine if data.own[k] is not None]
    gap = torch.cat([data.own[k] - data.rollout[k] for k in known]) if known else torch.zeros(0)
    # k3 of the gap: E[exp(r) - r - 1] with r = lp_rollout - lp_old, >= 0 and 0 iff equal.
    gap_k3 = (torch.exp(-gap) + gap - 1.0).sum().item()
    gap_sum, gap_count, gap_k3 = all_reduce([gap.abs().sum().item(), gap.numel(), gap_k3])
    (gap_max,) = all_reduce([gap.abs().max().item() if gap.numel() else 0.0], dist.ReduceOp.MAX)
    return {
        "train/loss": totals["loss"] / len(steps),
        "train/grad_norm": totals["grad_norm"] / len(steps),
        "train/clip_fraction": totals["clipped"] / totals["tokens"],
        "train/dual_clip_fraction": totals["dual_clipped"] / totals["tokens"],
        "train/reverse_kl": totals["reverse_kl"] / totals["tokens"],
        "train/logprob_gap_mean": gap_sum / max(gap_count, 1),
        "train/logprob_gap_max": gap_max,
        "train/logprob_gap_k3": gap_k3 / max(gap_count, 1),
        "train/optimizer_steps": len(steps),
        "train/micro_batches_per_step": totals["micro_batches"] / len(steps),
        "train/lr": engine.get_lr()[0],
        "train/response_tokens": totals["tokens"],
    }

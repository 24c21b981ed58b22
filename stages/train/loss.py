"""Every training loss, in one place (written out in docs/loss.md).

The card's loss is `k1` in policy-gradient form: the per-token advantage is the negative, clamped,
detached log-ratio between student and teacher on the student's own sampled token, fed to a PPO
surrogate with clip 0.2 and dual clip 3. Its gradient is the reverse-KL gradient. Two variants
change only the advantage, at k1's cost:
    vopd      k1's advantage minus a detached baseline, the value of the state: V_t = -KL(student || teacher)
              at position t, over the student's sampling-time top-k ids (vOPD, arXiv 2605.07865)
    poweropd  the bounded reward p_teacher^alpha - p_student^alpha of the sampled token in place of
              the log-ratio (PowerOPD, arXiv 2606.17199; the log-ratio is its alpha -> 0 limit, rescaled)

The other modes are direct (supervised) losses on the same tokens, each clamped at
`loss_max_clamp` (10) as verl clamps every estimator (a clamped token contributes no gradient):
    k2                      0.5 (lp - lq)^2
    k3                      exp(lq - lp) - (lq - lp) - 1   (log-ratio clamped at +-20 first and the
                            estimator at +-10, both as verl's kl_penalty does)
    abs                     |lp - lq|
    forward_kl_topk         verl's form: sum_k p_t,k (log p_t,k - log p_s,k) over the teacher's top-k ids,
                            with the student's full-vocabulary log-probs at those ids and the teacher's
                            values as given, both clamped below at `log_prob_min_clamp` (-10), then >= 0
    forward_kl_topk_renorm  KL(teacher || student) over the teacher's top-k ids, both renormalised on that set
    reverse_kl_topk         KL(student || teacher) over the student's top-k ids (from sampling), both renormalised

Truncated importance-sampling weights (train.tis) scale the policy-gradient terms only, as verl's.

Aggregation is the token mean over the whole mini-batch: callers pass `normaliser`, the number of
response tokens in the global mini-batch (divided by the data-parallel world size, since DeepSpeed
averages gradients over ranks), and sum the returned micro-batch losses. Normalising per
micro-batch instead inflates the loss by the number of micro-batches (a known peer bug).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import LOSSES, POLICY_GRADIENT_LOSSES

LOG_RATIO_CLAMP = 20.0  # exp() of a log-ratio beyond this overflows nothing but means nothing either (verl's bound)
K3_CLAMP = 10.0  # verl bounds its k3 estimator here, whatever loss_max_clamp says


@dataclass(frozen=True)
class LossConfig:
    mode: str = "k1"
    loss_max_clamp: float = 10.0    # k1: |lp - lq| bound before it becomes an advantage; others: loss_t bound
    log_prob_min_clamp: float = -10.0  # forward_kl_topk: log-probs floor (verl's)
    clip_ratio: float = 0.2         # PPO clip: r in [1 - c, 1 + c]
    dual_clip: float = 3.0          # where A < 0 the loss is capped at -dual_clip * A
    log_ratio_clamp: float = LOG_RATIO_CLAMP
    use_task_rewards: bool = False  # add a PPO term on the GRPO advantage of the rule reward
    distill_coef: float = 1.0       # with task rewards: loss = ppo(task) + distill_coef * distill
    power_alpha: float = 5.0        # poweropd's exponent


@dataclass
class TokenBatch:
    """A micro-batch's response tokens, flattened to [tokens] (top-k tensors: [tokens, k])."""
    logprobs: torch.Tensor                    # student, current forward (carries the gradient)
    old_logprobs: torch.Tensor | None         # lp_old: the trainer's log-probs before this iteration's updates
    teacher_logprobs: torch.Tensor
    weights: torch.Tensor | None = None       # truncated importance-sampling weights (detached)
    task_advantages: torch.Tensor | None = None
    # Top-k modes: both models' log-probs at the same k ids per token (the teacher's top-k for
    # forward_kl_topk, the student's sampling-time top-k for reverse_kl_topk and vopd's baseline).
    student_at_ids: torch.Tensor | None = None            # current forward: carries the gradient
    teacher_at_ids: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor        # this micro-batch's share of the mini-batch token mean (backward this)
    clipped_tokens: float     # tokens where a PPO clip was active (either bound or the dual clip)
    dual_clipped_tokens: float  # of those, tokens capped by the dual clip (A < 0; verl's pg_clipfrac_lower)
    reverse_kl_sum: float     # sum over tokens of lp - lq, for logging


def k1_advantage(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """A_t = -clamp(lp_t - lq_t): immediate, per token; no reward-to-go, discount or normalisation."""
    return -(logprobs.detach() - teacher_logprobs).clamp(-clamp, clamp)


def vopd_baseline(student_at_ids: torch.Tensor, teacher_at_ids: torch.Tensor) -> torch.Tensor:
    """V_t = E_{y ~ student}[lq(y) - lp(y)] = -KL(student || teacher) at position t: the expected k1
    reward of the state, here over the student's top-k ids, both renormalised on them (the exact value
    when k is the vocabulary). A function of the state only, so subtracting it leaves the gradient's
    expectation unchanged and lowers its variance. Detached."""
    return -_renormalised_kl(student_at_ids.detach(), teacher_at_ids)


def power_reward(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """p_teacher^alpha - p_student^alpha of the sampled token: in [-1, 1], of the log-ratio's sign, and
    (divided by alpha) the log-ratio as alpha -> 0. Detached."""
    return torch.exp(alpha * teacher_logprobs) - torch.exp(alpha * logprobs.detach())


def policy_gradient_advantage(batch: TokenBatch, config: LossConfig) -> torch.Tensor:
    """The detached per-token advantage of the policy-gradient modes (k1, vopd, poweropd)."""
    if config.mode == "poweropd":
        return power_reward(batch.logprobs, batch.teacher_logprobs, config.power_alpha)
    advantage = k1_advantage(batch.logprobs, batch.teacher_logprobs, config.loss_max_clamp)
    if config.mode == "vopd":
        advantage = advantage - vopd_baseline(_required(batch.student_at_ids, "vopd", "the student's top-k log-probs"),
                                              _required(batch.teacher_at_ids, "vopd", "the teacher's log-probs at "
                                                        "the student's top-k ids"))
    return advantage


def ppo_dual_clip(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate with dual clip; returns (loss_t, clipped_t, dual_clipped_t), the last two bool."""
    log_ratio = (logprobs - old_logprobs).clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio, 1.0 + config.clip_ratio)
    loss = torch.maximum(unclipped, clipped)
    capped = torch.minimum(loss, -advantages * config.dual_clip)
    loss = torch.where(advantages < 0, capped, loss)
    dual_clipped = (advantages < 0) & (capped < torch.maximum(unclipped, clipped))
    return loss, (clipped > unclipped) | dual_clipped, dual_clipped


def _renormalised_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row after renormalising both over the row's k ids: [tokens, k] -> [tokens]."""
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _required(value: torch.Tensor | None, mode: str, column: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"loss '{mode}' needs {column}, which this batch lacks")
    return value


def _direct_loss(batch: TokenBatch, config: LossConfig) -> torch.Tensor:
    """loss_t of the direct (supervised) modes, before the loss clamp."""
    lp, lq, mode = batch.logprobs, batch.teacher_logprobs, config.mode
    if mode == "k2":
        return 0.5 * (lp - lq) ** 2
    if mode == "k3":
        log_ratio = (lq - lp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
    if mode == "abs":
        return (lp - lq).abs()
    student = _required(batch.student_at_ids, mode, "the student's log-probs at the top-k ids")
    teacher = _required(batch.teacher_at_ids, mode, "the teacher's log-probs at the top-k ids")
    if mode == "forward_kl_topk":  # verl's form: unnormalised over the top-k, floored, never negative
        student, teacher = student.clamp_min(config.log_prob_min_clamp), teacher.clamp_min(config.log_prob_min_clamp)
        return (teacher.exp() * (teacher - student)).sum(-1).clamp_min(0.0)
    if mode == "forward_kl_topk_renorm":
        return _renormalised_kl(teacher, student)
    return _renormalised_kl(student, teacher)  # reverse_kl_topk


def distillation_per_token(batch: TokenBatch, config: LossConfig
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_t, clipped_t, dual_clipped_t) of the distillation term alone."""
    if config.mode not in LOSSES:
        raise ValueError(f"unknown loss '{config.mode}' (choose: {', '.join(LOSSES)})")
    if config.mode in POLICY_GRADIENT_LOSSES:
        return ppo_dual_clip(batch.logprobs, _required(batch.old_logprobs, config.mode, "lp_old"),
                             policy_gradient_advantage(batch, config), config)
    loss = _direct_loss(batch, config)
    never = torch.zeros_like(loss, dtype=torch.bool)
    return loss.clamp(-config.loss_max_clamp, config.loss_max_clamp), never, never


def distillation_loss(batch: TokenBatch, normaliser: float, config: LossConfig = LossConfig()) -> LossOutput:
    """The micro-batch's contribution to the mini-batch loss: sum of per-token losses / normaliser."""
    per_token, clipped, dual_clipped = distillation_per_token(batch, config)
    weights = batch.weights
    if weights is not None and config.mode in POLICY_GRADIENT_LOSSES:  # verl: the weights correct a PG loss only
        per_token = per_token * weights
    if config.use_task_rewards:
        task = _required(batch.task_advantages, "use_task_rewards", "task advantages")
        old = _required(batch.old_logprobs, "use_task_rewards", "lp_old")
        task_loss, task_clipped, task_dual_clipped = ppo_dual_clip(batch.logprobs, old, task, config)
        if weights is not None:
            task_loss = task_loss * weights
        per_token = task_loss + config.distill_coef * per_token
        clipped, dual_clipped = clipped | task_clipped, dual_clipped | task_dual_clipped
    return LossOutput(
        loss=per_token.sum() / normaliser,
        clipped_tokens=clipped.sum().item(),
        dual_clipped_tokens=dual_clipped.sum().item(),
        reverse_kl_sum=(batch.logprobs.detach() - batch.teacher_logprobs).sum().item(),
    )


def grpo_advantages(rewards: list[float], groups: list[str]) -> list[float]:
    """(R - mean) / (std + 1e-6) over the responses of each prompt; std is the unbiased one, 0 for n = 1."""
    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    advantages = [0.0] * len(rewards)
    for rows in members.values():
        values = torch.tensor([rewards[r] for r in rows], dtype=torch.float64)
        std = values.std().item() if len(rows) > 1 else 0.0
        for r, value in zip(rows, values.tolist()):
            advantages[r] = (value - values.mean().item()) / (std + 1e-6)
    return advantages


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(lp_old - lp_rollout), cap): corrects for sampler/trainer numeric gaps, bounded variance."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap).detach()

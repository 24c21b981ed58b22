"""The distillation loss, in one place (DESIGN §4).

The card's loss is k1 in policy-gradient form: the per-token advantage is the negative, clamped,
detached log-ratio between student and teacher on the student's own sampled token, fed to a PPO
surrogate with clip 0.2 and dual clip 3. Its gradient is the reverse-KL gradient.

Aggregation is the token mean over the whole mini-batch: callers pass `minibatch_tokens`, the number
of response tokens in the global mini-batch, and sum the returned micro-batch losses. Normalising
per micro-batch instead inflates the loss by the number of micro-batches (a known peer bug).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossConfig:
    kl_clamp: float = 10.0   # |lp - lq| bound before it becomes an advantage
    clip_ratio: float = 0.2  # PPO clip: r in [1 - c, 1 + c]
    dual_clip: float = 3.0   # where A < 0 the loss is capped at -dual_clip * A
    log_ratio_clamp: float = 20.0


def k1_advantage(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, kl_clamp: float) -> torch.Tensor:
    """A_t = -clamp(lp_t - lq_t): immediate, per token; no reward-to-go, discount or normalisation."""
    return -(student_logprobs.detach() - teacher_logprobs).clamp(-kl_clamp, kl_clamp)


def ppo_dual_clip(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate with dual clip; returns (loss_t, clipped_t as float)."""
    log_ratio = (logprobs - old_logprobs).clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - config.clip_ratio, 1.0 + config.clip_ratio)
    loss = torch.maximum(unclipped, clipped)
    capped = torch.minimum(loss, -advantages * config.dual_clip)
    loss = torch.where(advantages < 0, capped, loss)
    was_clipped = (clipped > unclipped) | ((advantages < 0) & (capped < torch.maximum(unclipped, clipped)))
    return loss, was_clipped.float()


@dataclass
class LossOutput:
    loss: torch.Tensor        # this micro-batch's share of the mini-batch token mean (backward this)
    clipped_tokens: float     # tokens where a clip was active
    reverse_kl_sum: float     # sum over tokens of lp - lq, for logging


def k1_policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    minibatch_tokens: int,
    config: LossConfig = LossConfig(),
) -> LossOutput:
    """All tensors are flat [tokens] over the micro-batch's response tokens (no padding)."""
    advantages = k1_advantage(logprobs, teacher_logprobs, config.kl_clamp)
    per_token, clipped = ppo_dual_clip(logprobs, old_logprobs, advantages, config)
    return LossOutput(
        loss=per_token.sum() / minibatch_tokens,
        clipped_tokens=clipped.sum().item(),
        reverse_kl_sum=(logprobs.detach() - teacher_logprobs).sum().item(),
    )

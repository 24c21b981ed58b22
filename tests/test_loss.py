"""The card's k1 loss against an independent float64 reference written here, token by token."""
import math
import random

import pytest
import torch

from stages.train.loss import LossConfig, k1_policy_gradient_loss


def reference(lp, old, lq, total_tokens, kl_clamp=10.0, clip=0.2, dual=3.0):
    """Plain-Python loss and d(loss)/d(lp) per token, straight from DESIGN §4."""
    loss, grads = 0.0, []
    for p, o, q in zip(lp, old, lq):
        advantage = -min(max(p - q, -kl_clamp), kl_clamp)
        ratio = math.exp(min(max(p - o, -20.0), 20.0))
        unclipped = -advantage * ratio
        clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
        clipped = -advantage * clipped_ratio
        value, grad = (unclipped, -advantage * ratio) if unclipped >= clipped else (
            clipped, -advantage * ratio if clipped_ratio == ratio else 0.0)
        if advantage < 0 and value > -dual * advantage:
            value, grad = -dual * advantage, 0.0
        loss += value / total_tokens
        grads.append(grad / total_tokens)
    return loss, grads


def random_case(seed, tokens):
    rng = random.Random(seed)
    # Spread wide enough to hit the KL clamp, both PPO clips and the dual clip.
    lp = [rng.uniform(-14, 0) for _ in range(tokens)]
    old = [p + rng.choice([0.0, rng.uniform(-1.5, 1.5)]) for p in lp]
    lq = [rng.uniform(-14, 0) for _ in range(tokens)]
    return lp, old, lq


@pytest.mark.parametrize("seed", range(5))
def test_loss_and_gradient_match_reference(seed):
    lp, old, lq = random_case(seed, 400)
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    out = k1_policy_gradient_loss(lp_t, torch.tensor(old, dtype=torch.float64), torch.tensor(lq, dtype=torch.float64),
                                  minibatch_tokens=len(lp))
    out.loss.backward()
    expected_loss, expected_grad = reference(lp, old, lq, len(lp))
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-10)
    assert torch.allclose(lp_t.grad, torch.tensor(expected_grad, dtype=torch.float64), atol=1e-10)


def test_regions_are_hit():
    lp, old, lq = random_case(0, 400)
    advantages = [-min(max(p - q, -10), 10) for p, q in zip(lp, lq)]
    ratios = [math.exp(p - o) for p, o in zip(lp, old)]
    assert any(abs(p - q) > 10 for p, q in zip(lp, lq)), "KL clamp"
    assert any(r > 1.2 for r in ratios) and any(r < 0.8 for r in ratios), "PPO clip"
    assert any(a < 0 and -a * r > -3 * a for a, r in zip(advantages, ratios)), "dual clip"


def test_micro_batch_split_gives_the_same_loss_and_gradient():
    """Token mean over the global mini-batch: cutting it into micro-batches changes nothing."""
    lp, old, lq = random_case(7, 256)
    lengths = [5, 17, 1, 40, 33, 60, 12, 88]
    tensors = [torch.tensor(v, dtype=torch.float64) for v in (lp, old, lq)]

    def run(cuts):
        lp_t = tensors[0].clone().requires_grad_(True)
        total, start = 0.0, 0
        for size in cuts:
            piece = slice(start, start + size)
            out = k1_policy_gradient_loss(lp_t[piece], tensors[1][piece], tensors[2][piece], minibatch_tokens=256)
            out.loss.backward()
            total += out.loss.item()
            start += size
        return total, lp_t.grad

    whole_loss, whole_grad = run([256])
    split_loss, split_grad = run(lengths)
    assert split_loss == pytest.approx(whole_loss, abs=1e-10)
    assert torch.allclose(split_grad, whole_grad, atol=1e-12)


def test_zero_when_student_equals_teacher():
    lp = torch.tensor([-0.5, -2.0, -0.1], dtype=torch.float64, requires_grad=True)
    out = k1_policy_gradient_loss(lp, lp.detach().clone(), lp.detach().clone(), minibatch_tokens=3, config=LossConfig())
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(lp.grad == 0)

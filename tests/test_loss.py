"""Every loss and its gradient against independent float64 references written here, token by token
(plain Python floats, gradients derived by hand), plus the GRPO advantage and the TIS weights."""
import math
import random

import pytest
import torch

from common.config import ConfigError, load_config
from stages.train.loss import LossConfig, TokenBatch, distillation_loss, grpo_advantages, truncated_is_weights

LOSS_CLAMP, LOG_PROB_FLOOR, CLIP, DUAL = 10.0, -10.0, 0.2, 3.0


# ---- references: (value, d value / d lp) per token ----------------------------------------

def ref_ppo(p, o, advantage):
    ratio = math.exp(min(max(p - o, -20.0), 20.0))
    unclipped = -advantage * ratio
    clipped_ratio = min(max(ratio, 1 - CLIP), 1 + CLIP)
    clipped = -advantage * clipped_ratio
    value, grad = (unclipped, -advantage * ratio) if unclipped >= clipped else (
        clipped, -advantage * ratio if clipped_ratio == ratio else 0.0)
    if advantage < 0 and value > -DUAL * advantage:
        value, grad = -DUAL * advantage, 0.0
    return value, grad


def loss_clamp(value, grad):
    """verl's loss_max_clamp on a direct loss: beyond it the token's loss is flat (no gradient)."""
    return (value, grad) if -LOSS_CLAMP <= value <= LOSS_CLAMP else (max(min(value, LOSS_CLAMP), -LOSS_CLAMP),
                                                                     0.0 * grad if isinstance(grad, float) else
                                                                     [0.0] * len(grad))


def ref_token(mode, p, o, q):
    if mode == "k1":
        return ref_ppo(p, o, -min(max(p - q, -LOSS_CLAMP), LOSS_CLAMP))
    if mode == "k2":
        return loss_clamp(0.5 * (p - q) ** 2, p - q)
    if mode == "k3":
        x = q - p
        inside = -20 < x < 20  # the log-ratio's own clamp (verl's), before the loss clamp
        x = min(max(x, -20.0), 20.0)
        return loss_clamp(math.exp(x) - x - 1, -(math.exp(x) - 1) if inside else 0.0)
    if mode == "abs":
        return loss_clamp(abs(p - q), 1.0 if p > q else -1.0)
    raise ValueError(mode)


def ref_renormalised(values):
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def ref_topk(mode, student, teacher):
    """The loss over k ids; gradient with respect to the student's k log-probs."""
    if mode == "forward_kl_topk":  # verl's: sum_j pt_j (t_j - s_j), both floored at -10, never negative
        s, t = [max(v, LOG_PROB_FLOOR) for v in student], [max(v, LOG_PROB_FLOOR) for v in teacher]
        value = sum(math.exp(y) * (y - x) for x, y in zip(s, t))
        grad = [-math.exp(y) if x > LOG_PROB_FLOOR else 0.0 for x, y in zip(student, t)]
        return loss_clamp(*((value, grad) if value >= 0 else (0.0, [0.0] * len(grad))))
    s, t = ref_renormalised(student), ref_renormalised(teacher)
    ps, pt = [math.exp(v) for v in s], [math.exp(v) for v in t]
    if mode == "forward_kl_topk_renorm":  # KL(teacher || student) after renormalising: d/ds_j = ps_j - pt_j
        return loss_clamp(sum(b * (y - x) for b, x, y in zip(pt, s, t)), [a - b for a, b in zip(ps, pt)])
    value = sum(a * (x - y) for a, x, y in zip(ps, s, t))  # KL(student || teacher)
    return loss_clamp(value, [a * (x - y - value) for a, x, y in zip(ps, s, t)])


def random_case(seed, tokens):
    rng = random.Random(seed)
    # Spread wide enough to hit the KL clamp, both PPO clips and the dual clip.
    lp = [rng.uniform(-14, 0) for _ in range(tokens)]
    old = [p + rng.choice([0.0, rng.uniform(-1.5, 1.5)]) for p in lp]
    lq = [rng.uniform(-14, 0) for _ in range(tokens)]
    return lp, old, lq


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tis", [False, True])
def test_token_losses_and_gradients_match_reference(mode, seed, tis):
    lp, old, lq = random_case(seed, 300)
    rollout = [o + random.Random(seed + 99).uniform(-1, 1) for o in old]
    weights = [min(math.exp(o - r), 2.0) for o, r in zip(old, rollout)] if tis else [1.0] * len(lp)
    lp_t = f64(lp).requires_grad_(True)
    batch = TokenBatch(lp_t, f64(old), f64(lq), weights=truncated_is_weights(f64(old), f64(rollout), 2.0) if tis else None)
    out = distillation_loss(batch, normaliser=len(lp), config=LossConfig(mode=mode))
    out.loss.backward()
    pairs = [ref_token(mode, p, o, q) for p, o, q in zip(lp, old, lq)]
    expected_loss = sum(w * v for w, (v, _) in zip(weights, pairs)) / len(lp)
    expected_grad = [w * g / len(lp) for w, (_, g) in zip(weights, pairs)]
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-10)
    assert torch.allclose(lp_t.grad, f64(expected_grad), atol=1e-10)


@pytest.mark.parametrize("mode", ["forward_kl_topk", "forward_kl_topk_renorm", "reverse_kl_topk"])
@pytest.mark.parametrize("seed", range(3))
def test_topk_losses_and_gradients_match_reference(mode, seed):
    rng = random.Random(seed)
    tokens, k = 50, 5
    student = [[rng.uniform(-12, 0) for _ in range(k)] for _ in range(tokens)]
    teacher = [[rng.uniform(-12, 0) for _ in range(k)] for _ in range(tokens)]
    student_t = f64(student).requires_grad_(True)
    lp = f64([row[0] for row in student])
    batch = TokenBatch(lp, lp, f64([row[0] for row in teacher]), student_at_ids=student_t, teacher_at_ids=f64(teacher))
    out = distillation_loss(batch, normaliser=tokens, config=LossConfig(mode=mode))
    out.loss.backward()
    pairs = [ref_topk(mode, s, t) for s, t in zip(student, teacher)]
    assert out.loss.item() == pytest.approx(sum(v for v, _ in pairs) / tokens, abs=1e-10)
    assert torch.allclose(student_t.grad, f64([[g / tokens for g in grads] for _, grads in pairs]), atol=1e-10)


def test_task_rewards_add_a_ppo_term_on_the_grpo_advantage():
    lp, old, lq = random_case(11, 40)
    rewards, groups = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5], ["a"] * 4 + ["b"] * 4
    lengths = [5] * 8
    advantages = grpo_advantages(rewards, groups)
    per_token_advantage = [a for a, n in zip(advantages, lengths) for _ in range(n)]
    lp_t = f64(lp).requires_grad_(True)
    batch = TokenBatch(lp_t, f64(old), f64(lq), task_advantages=f64(per_token_advantage))
    out = distillation_loss(batch, normaliser=40, config=LossConfig(mode="k1", use_task_rewards=True, distill_coef=0.3))
    out.loss.backward()
    expected_loss, expected_grad = 0.0, []
    for p, o, q, a in zip(lp, old, lq, per_token_advantage):
        task_value, task_grad = ref_ppo(p, o, a)
        distill_value, distill_grad = ref_token("k1", p, o, q)
        expected_loss += (task_value + 0.3 * distill_value) / 40
        expected_grad.append((task_grad + 0.3 * distill_grad) / 40)
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-10)
    assert torch.allclose(lp_t.grad, f64(expected_grad), atol=1e-10)


def test_grpo_advantage_matches_reference():
    rewards, groups = [1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 1.0], ["a"] * 4 + ["b"] * 4 + ["c"]
    got = grpo_advantages(rewards, groups)
    mean_a, std_a = 0.5, math.sqrt(sum((r - 0.5) ** 2 for r in rewards[:4]) / 3)  # unbiased std
    assert got[:4] == pytest.approx([(r - mean_a) / (std_a + 1e-6) for r in rewards[:4]], abs=1e-12)
    assert got[4:] == pytest.approx([0.0] * 5, abs=1e-12)  # equal rewards, and a lone response: no signal


def test_regions_are_hit():
    lp, old, lq = random_case(0, 300)
    advantages = [-min(max(p - q, -10), 10) for p, q in zip(lp, lq)]
    ratios = [math.exp(p - o) for p, o in zip(lp, old)]
    assert any(abs(p - q) > 10 for p, q in zip(lp, lq)), "KL clamp"
    assert any(0.5 * (p - q) ** 2 > 10 for p, q in zip(lp, lq)), "k2's loss clamp"
    assert any(math.exp(q - p) - (q - p) - 1 > 10 for p, q in zip(lp, lq)), "k3's loss clamp"
    assert any(r > 1.2 for r in ratios) and any(r < 0.8 for r in ratios), "PPO clip"
    assert any(a < 0 and -a * r > -3 * a for a, r in zip(advantages, ratios)), "dual clip"


def test_topk_regions_are_hit():
    """The top-k cases reach verl's floor, its clamp at 0 and the loss clamp, and leave them too."""
    values = {mode: [] for mode in ("forward_kl_topk", "forward_kl_topk_renorm", "reverse_kl_topk")}
    floored = False
    for seed in range(3):
        rng = random.Random(seed)
        student = [[rng.uniform(-12, 0) for _ in range(5)] for _ in range(50)]
        teacher = [[rng.uniform(-12, 0) for _ in range(5)] for _ in range(50)]
        floored |= any(v < LOG_PROB_FLOOR for row in student for v in row)
        for mode in values:
            values[mode] += [ref_topk(mode, s, t)[0] for s, t in zip(student, teacher)]
    assert floored
    assert any(v == 0.0 for v in values["forward_kl_topk"]) and any(0 < v < 10 for v in values["forward_kl_topk"])
    assert any(v == LOSS_CLAMP for mode in values for v in values[mode])


def test_a_k3_token_far_from_the_teacher_is_bounded_by_the_loss_clamp():
    """Without verl's clamp one k3 token reached ~2e4 (lq - lp = 10 -> e^10); now it is 10 with no gradient."""
    lp = f64([-12.0]).requires_grad_(True)
    out = distillation_loss(TokenBatch(lp, lp.detach(), f64([-2.0])), normaliser=1, config=LossConfig(mode="k3"))
    out.loss.backward()
    assert out.loss.item() == LOSS_CLAMP and lp.grad.item() == 0.0


def test_zero_when_student_equals_teacher():
    lp = f64([-1.0, -2.0, -0.5]).requires_grad_(True)
    for mode in ("k1", "k2", "k3", "abs"):
        out = distillation_loss(TokenBatch(lp, lp.detach(), lp.detach()), normaliser=3, config=LossConfig(mode=mode))
        assert out.loss.item() == pytest.approx(0.0, abs=1e-12)


def test_k1_without_policy_gradient_is_refused():
    with pytest.raises(ConfigError, match="train.policy_gradient"):
        load_config("configs/tiny.yaml", ["train.policy_gradient=false"])


def test_topk_loss_without_topk_columns_is_refused():
    with pytest.raises(ConfigError, match="generate.student_topk"):
        load_config("configs/tiny.yaml", ["train.loss=reverse_kl_topk"])
    load_config("configs/tiny.yaml", ["train.loss=reverse_kl_topk", "generate.student_topk=8"])

"""RL objectives against values worked out by hand with `math`, and numpy references written independently."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.losses.advantages import group_advantages
from align_jax.losses.rl import (
    entropy_from_logits,
    gae,
    kl_estimate,
    kl_in_reward,
    kl_loss_term,
    policy_gradient_loss,
    ptx_kl_term,
    reference_topk,
    topk_exact_kl,
    value_loss,
    whiten,
)

NAN = float("nan")


def f32(xs) -> jax.Array:
    return jnp.asarray(xs, jnp.float32)


def close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- group advantages


def test_group_advantages_sample_std_and_constant_group():
    # Groups of 3: [1,2,3] mean 2, sample std 1; [5,5,5] constant; [0,4,2] mean 2, sample std sqrt(8/2) = 2.
    adv = group_advantages(f32([1, 2, 3, 5, 5, 5, 0, 4, 2]), 3)
    e = 1e-4
    close(adv, [-1 / (1 + e), 0, 1 / (1 + e), 0, 0, 0, -2 / (2 + e), 2 / (2 + e), 0])
    assert np.all(np.isfinite(np.asarray(adv)))
    # Not the population std (sqrt(2/3) for the first group).
    assert float(adv[2]) != pytest.approx(1 / (math.sqrt(2 / 3) + e), rel=1e-3)


def test_group_advantages_centred_only():
    close(group_advantages(f32([1, 2, 3, 5, 5, 5]), 3, scale="none"), [-1, 0, 1, 0, 0, 0])
    close(group_advantages(f32([7.0]), 1, scale="none"), [0.0])


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 3"):
        group_advantages(f32([1, 2, 3, 4]), 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(f32([1, 2]), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(f32([1, 2]), 2, scale="batch")


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_closed_form():
    lp, lr = f32([[-1.0, -2.0, -0.75]]), f32([[-1.5, -0.5, -0.75]])
    diffs = [0.5, -1.5, 0.0]  # lp - lr
    close(kl_estimate(lp, lr, "k1"), [diffs])
    close(kl_estimate(lp, lr, "k2"), [[0.5 * x * x for x in diffs]])
    close(kl_estimate(lp, lr, "k3"), [[math.exp(-x) + x - 1 for x in diffs]])
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(lp, lr, "k4")


def test_k3_nonnegative_and_finite_for_extreme_logps():
    rng = np.random.default_rng(0)
    lp, lr = f32(rng.normal(size=(8, 64)) * 5), f32(rng.normal(size=(8, 64)) * 5)
    assert np.all(np.asarray(kl_estimate(lp, lr, "k3")) >= 0)
    extreme_lp, extreme_lr = f32([[-1e4, 0.0, -1e-8, -80.0]]), f32([[0.0, -1e4, 0.0, -1e-8]])
    for kind in ("k1", "k2", "k3"):
        kl = kl_estimate(extreme_lp, extreme_lr, kind)
        grad = jax.grad(lambda x, k=kind: jnp.sum(kl_estimate(x, extreme_lr, k)))(extreme_lp)
        assert np.all(np.isfinite(np.asarray(kl))) and np.all(np.isfinite(np.asarray(grad))), kind
    # lr - lp = -1e4: e^d vanishes and k3 = -d - 1.
    close(kl_estimate(extreme_lp, extreme_lr, "k3")[0, 1], 1e4 - 1)


def test_kl_loss_term_masks_padding():
    lp, lr = f32([[-1.0, -2.0, NAN], [-1.0, NAN, NAN]]), f32([[-1.5, -0.5, NAN], [-1.0, NAN, NAN]])
    total, count = kl_loss_term(lp, lr, f32([[1, 1, 0], [1, 0, 0]]))
    close(total, (math.exp(-0.5) + 0.5 - 1) + (math.exp(1.5) - 1.5 - 1) + 0.0)
    assert float(count) == 3
    grad = jax.grad(lambda x: kl_loss_term(x, lr, f32([[1, 1, 0], [1, 0, 0]]))[0])(lp)
    close(grad, [[1 - math.exp(-0.5), 1 - math.exp(1.5), 0], [0, 0, 0]])  # d k3 / d lp = 1 - e^(lr - lp)


# ---------------------------------------------------------------- top-k exact KL


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), -1, keepdims=True))


def numpy_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis, in float64."""
    logp, logq = numpy_log_softmax(p_logits), numpy_log_softmax(q_logits)
    return np.sum(np.exp(logp) * (logp - logq), -1)


def random_logits(seed: int, shape=(2, 5, 7)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 3).astype(np.float32), (rng.normal(size=shape) * 3).astype(np.float32)


def test_topk_kl_equals_full_kl_when_k_is_vocab():
    policy, ref = random_logits(1)
    values, indices = reference_topk(f32(ref), 7)
    close(topk_exact_kl(f32(policy), values, indices), numpy_kl(policy, ref), rtol=1e-4, atol=1e-5)
    # Log-probs instead of logits: the same numbers.
    logp = jax.nn.log_softmax(f32(policy), axis=-1)
    close(topk_exact_kl(logp, values, indices), numpy_kl(policy, ref), rtol=1e-4, atol=1e-5)


def test_topk_kl_renormalises_over_reference_topk():
    policy, ref = random_logits(2)
    values, indices = reference_topk(f32(ref), 3)
    idx = np.argsort(-ref, axis=-1)[..., :3]  # numpy's own top-3 (random floats: no ties)
    expected = numpy_kl(np.take_along_axis(policy, idx, -1), np.take_along_axis(ref, idx, -1))
    kl = topk_exact_kl(f32(policy), values, indices)
    close(kl, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(kl) >= 0)


def test_topk_kl_nonnegative_and_zero_when_equal_on_topk():
    for seed in range(5):
        policy, ref = random_logits(10 + seed, shape=(3, 4, 50))
        values, indices = reference_topk(f32(ref), 10)
        assert np.all(np.asarray(topk_exact_kl(f32(policy), values, indices)) >= 0)
    # Policy = reference + a per-position constant on the top-k, anything at all elsewhere: KL_S = 0.
    _, ref = random_logits(3, shape=(2, 4, 20))
    values, indices = reference_topk(f32(ref), 5)
    policy = np.full_like(ref, -30.0)
    np.put_along_axis(policy, np.asarray(indices), np.asarray(values) + 2.5, axis=-1)
    close(topk_exact_kl(f32(policy), values, indices), np.zeros((2, 4)), atol=1e-6)


def test_topk_kl_extreme_logits_finite_and_ptx_gradient():
    policy, ref = random_logits(4)
    policy[0, 0] *= 1e4
    values, indices = reference_topk(f32(ref * 1e3), 4)
    mask = f32(np.ones((2, 5)) * (np.arange(5) < 3))
    total, count = ptx_kl_term(f32(policy), values, indices, mask)
    grad = jax.grad(lambda x: ptx_kl_term(x, values, indices, mask)[0])(f32(policy))
    assert np.isfinite(float(total)) and float(count) == 6
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[:, 3:] == 0)  # padding positions get no gradient


# ---------------------------------------------------------------- KL in the reward


def test_kl_in_reward_layout():
    kl = f32([[0.1, 0.2, 0.3, NAN], [0.5, NAN, NAN, NAN], [NAN] * 4])
    mask = f32([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards = kl_in_reward(f32([2.0, -1.0, 5.0]), kl, mask, kl_coef=0.1)
    close(rewards, [[-0.01, -0.02, -0.03 + 2.0, 0.0], [-0.05 - 1.0, 0, 0, 0], [0, 0, 0, 0]])


# ---------------------------------------------------------------- clipped surrogate

# Ratios per token, old logp -1 everywhere, eps = 0.2. Row 0: A = +1, ratio inside / above / below the range;
# row 1: A = -1, below / above / inside; row 2: A = 2, one real token then padding (nan); row 3: all padding.
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 1.1], [1.0, NAN, NAN], [NAN, NAN, NAN]]
SEQ_ADV = [1.0, -1.0, 2.0, 0.0]
MASK = [[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]]
# -min(r A, clip(r) A): row 0: -1.1, -min(1.5, 1.2), -min(0.5, 0.8); row 1: -min(-0.5, -0.8), 1.5, 1.1; row 2: -2.
TOKEN_LOSSES = [[-1.1, -1.2, -0.5], [0.8, 1.5, 1.1], [-2.0, 0, 0], [0, 0, 0]]


def pg_inputs():
    old = np.full((4, 3), -1.0, np.float32)
    logp = np.asarray([[math.log(r) - 1.0 if not math.isnan(r) else NAN for r in row] for row in RATIOS])
    old[np.isnan(logp)] = NAN
    return f32(logp), f32(old)


def test_clipped_objective_token_normalisation():
    logp, old = pg_inputs()
    loss_sum, denom, metrics = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK))
    close(loss_sum, sum(map(sum, TOKEN_LOSSES)))
    assert float(denom) == 7
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 1.1, 1.0]
    close(metrics["ratio"], (sum(ratios), 7))
    close(metrics["clip_fraction"], (2, 7))  # row 0 token 1 (high), row 1 token 0 (low)
    close(metrics["clip_fraction_low"], (1, 7))
    close(metrics["clip_fraction_high"], (1, 7))
    close(metrics["approx_kl"], (sum(r - 1 - math.log(r) for r in ratios), 7), atol=1e-5)


def test_clipped_objective_sequence_normalisation_and_token_advantages():
    logp, old = pg_inputs()
    loss_sum, denom, _ = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), normalise="sequence")
    close(loss_sum, (-1.1 - 1.2 - 0.5) / 3 + (0.8 + 1.5 + 1.1) / 3 + (-2.0) / 1)
    assert float(denom) == 3  # the all-padding row is not a sequence
    per_token_adv = f32(np.repeat(np.asarray(SEQ_ADV, np.float32)[:, None], 3, axis=1))
    close(policy_gradient_loss(logp, old, per_token_adv, f32(MASK))[0], sum(map(sum, TOKEN_LOSSES)))


def test_clip_higher():
    logp, old = pg_inputs()
    loss_sum, _, metrics = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), clip_eps_high=0.6)
    # Row 0 token 1 (ratio 1.5, A = +1) is now inside [0.8, 1.6]: -1.5 instead of -1.2.
    close(loss_sum, sum(map(sum, TOKEN_LOSSES)) - 0.3)
    close(metrics["clip_fraction_high"], (0, 7))


def test_policy_gradient_sign():
    logp, old = pg_inputs()
    grad = jax.grad(lambda x: policy_gradient_loss(x, old, f32(SEQ_ADV), f32(MASK))[0])(logp)
    # d(-r A)/d logp = -r A where the unclipped branch is active, 0 where the clip is; padding: 0, not nan.
    close(grad, [[-1.1, 0.0, -0.5], [0.0, 1.5, 1.1], [-2.0, 0, 0], [0, 0, 0]])


def test_policy_loss_extreme_logps_finite_and_jittable():
    logp = f32([[0.0, -1e4, -1e-6]])
    old = f32([[-1e4, 0.0, -80.0]])
    fn = jax.jit(functools.partial(policy_gradient_loss, clip_eps=0.2, normalise="sequence"))
    for adv in (1.0, -1.0):
        loss_sum, denom, metrics = fn(logp, old, f32([adv]), f32([[1, 1, 1]]))
        grad = jax.grad(lambda x, a=adv: fn(x, old, f32([a]), f32([[1, 1, 1]]))[0])(logp)
        values = [loss_sum, denom, grad, *(v for pair in metrics.values() for v in pair)]
        assert all(np.all(np.isfinite(np.asarray(v))) for v in values)


def test_bad_normalise():
    logp, old = pg_inputs()
    with pytest.raises(ValueError, match="normalise"):
        policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), normalise="batch")


# ---------------------------------------------------------------- entropy


def test_entropy():
    logits = f32([[[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]], [[NAN] * 4] * 2])
    total, count = entropy_from_logits(logits, f32([[1, 1], [0, 0]]))
    close(total, math.log(4) + 1.5 * math.log(2))
    assert float(count) == 2
    grad = jax.grad(lambda x: entropy_from_logits(x, f32([[1, 1], [0, 0]]))[0])(logits)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[1] == 0)


# ---------------------------------------------------------------- PPO: GAE, value loss, whitening


def numpy_gae(rewards, values, lengths, gamma, lam):
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


def test_gae_hand_computed():
    # gamma = lam = 1: delta_1 = 1 - 0.2 = 0.8, delta_0 = 0.2 - 0.5 = -0.3, A_0 = 0.5; returns = reward-to-go = 1.
    adv, ret = gae(f32([[0.0, 1.0]]), f32([[0.5, 0.2]]), f32([[1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.8]])
    close(ret, [[1.0, 1.0]])


def test_gae_matches_loop_with_varying_lengths():
    rng = np.random.default_rng(5)
    lengths = [6, 3, 1, 0]
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    mask = (np.arange(6)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    expected_adv, expected_ret = numpy_gae(rewards, values, lengths, 0.9, 0.8)
    rewards[mask == 0], values[mask == 0] = NAN, 123.0  # padding must not leak in
    adv, ret = jax.jit(functools.partial(gae, gamma=0.9, lam=0.8))(f32(rewards), f32(values), f32(mask))
    close(adv, expected_adv)
    close(ret, expected_ret)


def test_value_loss_clipping():
    # clip 0.2. Inside the range: 0.5 (1 - 2)^2. V=1.5 from V_old=1 towards R=2: the clipped 1.2 is farther, its
    # 0.5 * 0.8^2 wins and the gradient is 0. Away from R=0: the unclipped 0.5 * 1.5^2. V=0 from 1, R=2: 0.5 * 2^2.
    values, old = f32([1.0, 1.5, 1.5, 0.0, NAN]), f32([0.9, 1.0, 1.0, 1.0, NAN])
    returns, mask = f32([2.0, 2.0, 0.0, 2.0, NAN]), f32([1, 1, 1, 1, 0])
    total, count = value_loss(values, old, returns, mask, clip_eps=0.2)
    close(total, 0.5 + 0.32 + 1.125 + 2.0)
    assert float(count) == 4
    grad = jax.grad(lambda v: value_loss(v, old, returns, mask, clip_eps=0.2)[0])(values)
    close(grad, [-1.0, 0.0, 1.5, -2.0, 0.0])


def test_whiten():
    x, mask = f32([[1.0, 2.0, 3.0, NAN]]), f32([[1, 1, 1, 0]])
    # mean 2, sample variance 1.
    close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-6)

"""The 2025 loss and advantage variants (DAPO, Dr. GRPO, GSPO, CISPO, RLOO, REINFORCE++) and the sampler/trainer
log-prob pieces (mismatch, truncated importance sampling), against hand computations and closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.losses.advantages import (
    fill_groups,
    informative_groups,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from align_jax.losses.rl import logp_mismatch, policy_gradient_loss, tis_weights
from align_jax.rollout import place_sampler_logp
from tests.losses.test_rl import MASK, NAN, RATIOS, SEQ_ADV, TOKEN_LOSSES, close, f32, pg_inputs

REAL = np.asarray(MASK, bool)

# ---------------------------------------------------------------- advantages


def test_rloo_leave_one_out():
    # [1,2,3]: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; [5,5,5]: 0; [0,4,2]: 0 - 3, 4 - 1, 2 - 2.
    close(rloo_advantages(f32([1, 2, 3, 5, 5, 5, 0, 4, 2]), 3), [-1.5, 0, 1.5, 0, 0, 0, -3, 3, 0])
    r = np.random.default_rng(0).normal(size=12)
    g = r.reshape(-1, 4)
    close(rloo_advantages(f32(r), 4), (4 / 3 * (g - g.mean(1, keepdims=True))).reshape(-1), atol=1e-5)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(f32([1.0]), 1)


def numpy_reinforce_pp(scores, kl, lengths, kl_coef):
    rets = []
    for s, k, n in zip(scores, kl, lengths, strict=True):
        r = [-kl_coef * k[t] for t in range(n)]
        if n:
            r[-1] += s
        rets.append([sum(r[t:]) for t in range(n)])
    flat = np.asarray([x for row in rets for x in row])
    mean, std = flat.mean(), flat.std(ddof=1)
    out = np.zeros(np.shape(kl))
    for i, row in enumerate(rets):
        out[i, : len(row)] = (np.asarray(row) - mean) / std
    return out


def test_reinforce_pp_returns_whitened_over_the_batch():
    kl = [[0.1, 0.2, 0.3], [0.5, NAN, NAN], [NAN, NAN, NAN], [0.0, 0.4, NAN]]
    mask = f32([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    scores = [1.0, 0.0, 7.0, 3.0]
    adv = reinforce_pp_advantages(f32(scores), f32(kl), mask, kl_coef=0.1)
    # Row 0's returns: 0.94, 0.95, 0.97 (KL to come + the score); the padding row gets nothing.
    close(adv, numpy_reinforce_pp(scores, np.nan_to_num(kl), [3, 1, 0, 2], 0.1), atol=1e-4)
    real = np.asarray(mask) > 0
    assert abs(np.asarray(adv)[real].mean()) < 1e-5 and np.asarray(adv)[real].std(ddof=1) == pytest.approx(1, 1e-3)
    # The baseline variant subtracts each group's mean score first (groups of 2: [1, 0], [7, 3]).
    base = reinforce_pp_advantages(f32(scores), f32(kl), mask, kl_coef=0.1, group_size=2)
    close(base, numpy_reinforce_pp([0.5, -0.5, 2.0, -2.0], np.nan_to_num(kl), [3, 1, 0, 2], 0.1), atol=1e-4)


def test_dynamic_sampling_filter_and_refill():
    keep = informative_groups(f32([1, 1, 1, 0, 1, 0, 2, 2, 2, 3, 4, 5]), 3)
    assert np.asarray(keep).tolist() == [False, True, False, True]
    # Informative groups first in sampling order, then dropped ones as fillers.
    idx, filler = fill_groups(np.asarray([False, True, False, True, True, False]), 4)
    assert idx.tolist() == [1, 3, 4, 0] and filler == 1
    idx, filler = fill_groups(np.asarray([True, True, False, True]), 2)
    assert idx.tolist() == [0, 1] and filler == 0
    with pytest.raises(ValueError, match="needs 4"):
        fill_groups(np.asarray([True, True]), 4)


def test_overlong_penalty_piecewise():
    # L_max 10, buffer 4: free up to 6, then (6 - L) / 4 down to -1 at 10, -1 beyond.
    close(overlong_penalty(f32([3, 6, 7, 8, 10, 11]), max_len=10, buffer=4), [0, 0, -0.25, -0.5, -1, -1])
    close(overlong_penalty(f32([3, 10]), max_len=10, buffer=0), [0, 0])


# ---------------------------------------------------------------- policy losses


def test_dr_grpo_constant_normaliser():
    logp, old = pg_inputs()
    loss_sum, denom, _ = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), normalise="constant", max_len=5)
    close(loss_sum, sum(map(sum, TOKEN_LOSSES)))
    assert float(denom) == 3 * 5  # three non-empty samples x max_len, whatever their lengths
    with pytest.raises(ValueError, match="max_len"):
        policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), normalise="constant")
    with pytest.raises(ValueError, match="kind"):
        policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), kind="trpo")


def test_cispo_keeps_every_gradient_with_a_clipped_constant_weight():
    logp, old = pg_inputs()
    loss_sum, denom, metrics = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), kind="cispo")
    w = np.clip(np.nan_to_num(RATIOS, nan=1.0), 0.8, 1.2)
    adv = np.asarray(SEQ_ADV)[:, None]
    close(loss_sum, np.sum(np.where(REAL, -w * adv * np.log(np.nan_to_num(RATIOS, nan=1.0)), 0)))
    assert float(denom) == 7
    grad = jax.grad(lambda x: policy_gradient_loss(x, old, f32(SEQ_ADV), f32(MASK), kind="cispo")[0])(logp)
    # -sg(w) A d logp: no token loses its gradient (PPO's clip zeroes two of these), padding gets 0.
    close(grad, np.where(REAL, -w * adv, 0.0))
    close(metrics["clip_fraction_low"], (2, 7))  # ratio 0.5 in rows 0 and 1
    close(metrics["clip_fraction_high"], (2, 7))  # ratio 1.5 in rows 0 and 1
    close(metrics["clip_fraction"], (4, 7))


def gspo_sequence_form(logp, old, adv, mask, eps_low, eps_high):
    """GSPO's own sequence objective, written from the paper: -1/G sum_i min(s_i A_i, clip(s_i) A_i)."""
    m = jnp.asarray(mask) > 0
    n = jnp.sum(m, axis=1)
    s = jnp.exp(jnp.sum(jnp.where(m, logp - old, 0.0), axis=1) / jnp.maximum(n, 1))
    terms = -jnp.minimum(s * adv, jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv)
    return jnp.sum(jnp.where(n > 0, terms, 0.0)), s


def test_gspo_sequence_ratio_value_and_gradient():
    logp, old = pg_inputs()
    clean_old = jnp.nan_to_num(old)
    adv = f32(SEQ_ADV)
    kw = dict(kind="gspo", clip_eps=0.05, clip_eps_high=0.1, normalise="sequence")
    loss_sum, denom, metrics = policy_gradient_loss(logp, old, adv, f32(MASK), **kw)
    # Rows 0 and 1: s = (1.1 * 1.5 * 0.5)^(1/3) = 0.9379. Row 0 (A = +1) is inside the min's reach: -s; row 1
    # (A = -1) is below 1 - 0.05: the clip holds it at 0.95. Row 2: s = 1, A = 2: -2.
    s = 0.825 ** (1 / 3)
    close(loss_sum, -s + 0.95 - 2.0)
    assert float(denom) == 3
    close(metrics["ratio"], (3 * s + 3 * s + 1, 7))
    close(metrics["clip_fraction_low"], (3, 7))
    close(metrics["clip_fraction_high"], (0, 7))
    x = jnp.nan_to_num(logp)
    ours = jax.grad(lambda y: policy_gradient_loss(y, old, adv, f32(MASK), **kw)[0])(x)
    ref = jax.grad(lambda y: gspo_sequence_form(y, clean_old, adv, f32(MASK), 0.05, 0.1)[0])(x)
    close(ours, ref, atol=1e-6)
    close(ours[0], [-s / 3] * 3)  # d(-s)/d lp_t = -s / |o|
    close(ref, np.where(REAL, ours, 0.0))  # padding: 0


def test_gspo_token_form_takes_per_token_advantages():
    logp, old = pg_inputs()
    adv = np.repeat(np.asarray(SEQ_ADV, np.float32)[:, None], 3, axis=1)
    adv[0] = [1.0, 0.5, -1.0]  # e.g. KL to come in the reward
    kw = dict(kind="gspo", clip_eps=0.05, clip_eps_high=0.1, normalise="sequence")
    loss_sum, _, _ = policy_gradient_loss(logp, old, f32(adv), f32(MASK), **kw)
    s = 0.825 ** (1 / 3)
    # Row 0: each token's -min(s A_t, clip(s) A_t) with s = 0.938 < 0.95: A > 0 -> -s A, A < 0 -> -0.95 A.
    row0 = (-s * 1.0 - s * 0.5 + 0.95 * 1.0) / 3
    close(loss_sum, row0 + 0.95 - 2.0)


# ---------------------------------------------------------------- sampler vs trainer


def test_tis_weights_truncate_and_are_one_without_mismatch():
    old = f32([[0.0, math.log(1.5), math.log(3.0)], [math.log(0.5), NAN, NAN]])
    sampler = f32([[0.0, 0.0, 0.0], [0.0, NAN, NAN]])
    mask = f32([[1, 1, 1], [1, 0, 0]])
    w, metrics = tis_weights(old, sampler, mask, cap=2.0)
    close(w, [[1.0, 1.5, 2.0], [0.5, 0, 0]])
    close(metrics["tis/weight"], (5.0, 4))
    close(metrics["tis/truncated"], (1, 4))
    w_seq, _ = tis_weights(old, sampler, mask, cap=2.0, per_sequence=True)
    close(w_seq, [[4.5 ** (1 / 3)] * 3, [0.5, 0, 0]])
    same = f32([[-1.0, -2.0, -3.0], [-0.5, NAN, NAN]])
    w, metrics = tis_weights(same, same, mask, cap=2.0)
    close(w, [[1, 1, 1], [1, 0, 0]])
    close(metrics["tis/truncated"], (0, 4))


def test_weights_scale_each_token_term_and_its_gradient():
    logp, old = pg_inputs()
    w = np.where(REAL, [[2.0, 1.0, 0.5]] * 4, NAN)
    loss_sum, denom, _ = policy_gradient_loss(logp, old, f32(SEQ_ADV), f32(MASK), weights=f32(w))
    close(loss_sum, np.sum(np.where(REAL, np.nan_to_num(w) * np.asarray(TOKEN_LOSSES), 0)))
    assert float(denom) == 7
    unweighted = jax.grad(lambda x: policy_gradient_loss(x, old, f32(SEQ_ADV), f32(MASK))[0])(logp)
    weighted = jax.grad(lambda x: policy_gradient_loss(x, old, f32(SEQ_ADV), f32(MASK), weights=f32(w))[0])(logp)
    close(weighted, np.nan_to_num(w) * np.asarray(unweighted))


def test_logp_mismatch_metrics():
    sampler = f32([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    trainer = f32([[-1.1, -2.0, NAN], [-0.3, NAN, NAN]])
    mask = f32([[1, 1, 0], [1, 0, 0]])
    out = logp_mismatch(sampler, trainer, mask)
    close(out["max"], 0.2, atol=1e-6)
    close(out["mean"], 0.3 / 3, atol=1e-6)
    k3 = sum(math.exp(d) - d - 1 for d in (-0.1, 0.0, 0.2))  # d = trainer - sampler
    close(out["kl"], k3 / 3, atol=1e-7)
    same = logp_mismatch(sampler, sampler, mask)
    assert all(float(v) == 0.0 for v in same.values())


def test_sampler_logprobs_land_in_old_logp_columns():
    # Row 0: prompt of 2, 3 tokens a, b, c -> columns 1, 2, 3. Row 1: prompt of 3, 2 tokens -> columns 2, 3.
    lp = np.asarray([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]], np.float32)
    out = place_sampler_logp(lp, np.asarray([2, 3]), np.asarray([3, 2]), 7)
    close(out, [[0, -1, -2, -3, 0, 0, 0], [0, 0, -4, -5, 0, 0, 0]])

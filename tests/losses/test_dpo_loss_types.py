"""TRL 1.x's newer DPO loss types (sigmoid_norm, aot, aot_unpaired, discopop) and bco_pair's optional
shift, against closed forms worked out in float64 numpy; AOT's sort with padding pairs left out."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import ConfigValueError, validate
from align_jax.losses.dpo import Objective, preference_loss
from align_jax.losses.pairs import sequence_logps, split_pairs
from align_jax.losses.preference import DISCOPOP_TAU, dpo_loss
from tests.losses.test_packed_pairs import make_pairs, packed_batch
from tests.test_configs import load_preset

BETA = 0.1
# Six pairs; pair 3 is padding (mask 0) with extreme values that would move every sort it took part in.
PC = np.array([-10.0, -3.5, -50.0, -300.0, -6.5, -21.0])
PR = np.array([-12.0, -2.25, -49.0, -1.0, -30.0, -18.0])
RC = np.array([-11.0, -4.0, -50.0, -1.0, -8.0, -20.0])
RR = np.array([-11.5, -1.0, -49.0, -400.0, -20.0, -19.5])
MASK = np.array([1, 1, 1, 0, 1, 1])
CHOSEN_LEN = np.array([4, 2, 8, 0, 1, 6])
REJECTED_LEN = np.array([3, 5, 8, 0, 4, 2])


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def f32(x):
    return jnp.asarray(x, jnp.float32)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


def run(loss_type, pc=PC, pr=PR, rc=RC, rr=RR, **kw):
    kw.setdefault("beta", BETA)
    return dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), loss_type=loss_type, **kw)


def smoothed(z, ls):
    return -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)


# ---------------------------------------------------------------- sigmoid_norm


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_sigmoid_norm_closed_form(ls):
    losses, cr, rj = run(
        "sigmoid_norm", chosen_lengths=jnp.asarray(CHOSEN_LEN), rejected_lengths=jnp.asarray(REJECTED_LEN),
        label_smoothing=ls,
    )  # fmt: skip
    a, r = PC - RC, PR - RR
    # Per-token log-ratios; a 0-token (padding) pair divides by 1 and stays finite.
    margin = a / np.maximum(CHOSEN_LEN, 1) - r / np.maximum(REJECTED_LEN, 1)
    close(losses, smoothed(BETA * margin, ls))
    assert bool(jnp.all(jnp.isfinite(losses)))
    close(cr, BETA * a)  # rewards from summed logps, as TRL 1.x reports them
    close(rj, BETA * r)


def test_sigmoid_norm_needs_lengths():
    with pytest.raises(ValueError, match=r"sigmoid_norm.*chosen_lengths and rejected_lengths"):
        run("sigmoid_norm")


# ---------------------------------------------------------------- aot, aot_unpaired


def aot_expected(x, y, mask, ls):
    """Per pair: slot k = x's rank among the real pairs; loss of b * (sorted x - sorted y) there."""
    real = np.flatnonzero(mask)
    xs, ys = np.sort(x[real]), np.sort(y[real])
    slot_losses = smoothed(BETA * (xs - ys), ls)
    out = np.zeros(len(x))
    for i in real:
        out[i] = slot_losses[int(np.sum(x[real] < x[i]))]  # x's values here have no ties
    return out, slot_losses.sum()


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_closed_form_with_a_padding_pair(loss_type, ls):
    if loss_type == "aot":  # policy and reference margins, sorted separately
        x, y = PC - PR, RC - RR
    else:  # chosen and rejected log-ratios, sorted separately
        x, y = PC - RC, PR - RR
    want, want_sum = aot_expected(x, y, MASK, ls)
    losses, cr, _ = run(loss_type, pair_mask=jnp.asarray(MASK), label_smoothing=ls)
    real = MASK > 0
    close(np.asarray(losses)[real], want[real])
    close(float((losses * MASK).sum()), want_sum)  # TRL's sum over the sorted slots
    assert bool(jnp.all(jnp.isfinite(losses)))
    close(cr, BETA * (PC - RC))
    # Had the padding pair been sorted with the rest, the sum would differ: the test can see it.
    unmasked, _ = aot_expected(x, y, np.ones_like(MASK), ls)
    assert abs(unmasked[real].sum() - want_sum) > 1e-2
    # The same pairs laid out [B, P] = [2, 3], and the real pairs alone, give the same sum.
    grid = run(loss_type, *(v.reshape(2, 3) for v in (PC, PR, RC, RR)), pair_mask=jnp.asarray(MASK.reshape(2, 3)),
               label_smoothing=ls)[0]  # fmt: skip
    assert grid.shape == (2, 3)
    close(float((grid * MASK.reshape(2, 3)).sum()), want_sum)
    alone = run(loss_type, PC[real], PR[real], RC[real], RR[real], label_smoothing=ls)[0]
    close(float(alone.sum()), want_sum)


def test_aot_gradients_stay_with_real_pairs():
    m = f32(MASK)

    def total(pc, pr, loss_type):
        return (run(loss_type, pc, pr, pair_mask=m)[0] * m).sum()

    # aot: d/dpc_i = -b sig(-b delta) at pair i's own slot (the reference side is data).
    g_pc, g_pr = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR), "aot")
    x, y = PC - PR, RC - RR
    real = np.flatnonzero(MASK)
    xs, ys = np.sort(x[real]), np.sort(y[real])
    want = np.zeros(len(PC))
    for i in real:
        k = int(np.sum(x[real] < x[i]))
        want[i] = -BETA * sigmoid(-BETA * (xs[k] - ys[k]))
    close(g_pc, want)
    close(g_pr, -want)
    # aot_unpaired: both sides are the policy's; the rejected ratio's gradient goes to its own slot.
    _, g_pr = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR), "aot_unpaired")
    a, r = PC - RC, PR - RR
    as_, rs = np.sort(a[real]), np.sort(r[real])
    want = np.zeros(len(PC))
    for j in real:
        k = int(np.sum(r[real] < r[j]))
        want[j] = BETA * sigmoid(-BETA * (as_[k] - rs[k]))
    close(g_pr, want)
    assert float(g_pr[3]) == 0.0


def test_aot_on_a_packed_batch_leaves_padding_pairs_out():
    # 5 pairs in 2 rows of 3 slots: the last slot is padding (all-zero logps).
    batch = packed_batch([make_pairs(5, seed=7)[:3], make_pairs(5, seed=7)[3:]])
    ref_table = jax.random.normal(jax.random.key(0), (61, 61))
    policy_table = ref_table + 0.3 * jax.random.normal(jax.random.key(1), (61, 61))

    def apply_fn(table, tokens, positions, segment_ids, **kw):
        return table[tokens]  # a bigram model: cheap, and different logps per pair

    (pc, pr), (rc, rr) = (
        split_pairs(sequence_logps(t, batch, apply_fn=apply_fn)[0]) for t in (policy_table, ref_table)
    )
    mask = np.asarray(batch["pair_mask"]).reshape(-1)
    for loss_type, x, y in [("aot", pc - pr, rc - rr), ("aot_unpaired", pc - rc, pr - rr)]:
        obj = Objective(loss_type=loss_type, beta=0.5)
        loss_sum, n, _ = preference_loss(policy_table, batch, None, apply_fn=apply_fn, objective=obj, frozen=ref_table)
        x, y = (np.asarray(v, np.float64).reshape(-1) for v in (x, y))
        real = np.flatnonzero(mask)
        want = smoothed(0.5 * (np.sort(x[real]) - np.sort(y[real])), 0.0).sum()
        close(float(loss_sum), want)
        assert float(n) == 5


# ---------------------------------------------------------------- discopop


@pytest.mark.parametrize("tau", [DISCOPOP_TAU, 0.5, 1.0])
@pytest.mark.parametrize("beta", [BETA, 1.0])
def test_discopop_closed_form(tau, beta):
    losses, cr, _ = run("discopop", beta=beta, discopop_tau=tau)
    z = beta * ((PC - RC) - (PR - RR))
    m = sigmoid(z / tau)
    # Eq. 5 of DiscoPOP as TRL writes it. Pair 5 has z = -2.5 b; the padding pair z = -698 b, where at
    # b = 1 e^-z overflows float32 and m underflows: the loss must still match.
    close(losses, (1 - m) * -log_sigmoid(z) + m * np.exp(-z))
    close(cr, beta * (PC - RC))
    zero = 2  # policy == reference: m = 1/2, so (log 2 + 1) / 2
    assert float(losses[zero]) == pytest.approx((np.log(2.0) + 1.0) / 2, rel=1e-6)


def test_discopop_default_tau_and_a_very_negative_logit():
    losses, _, _ = run("discopop", [-1.0], [-41.0], [0.0], [0.0], beta=1.0)  # z = 40
    default, _, _ = run("discopop", [-1.0], [-41.0], [0.0], [0.0], beta=1.0, discopop_tau=0.05)
    close(losses, default)
    # z = -40: e^40 times m = sig(-800) (0 in float32); the product stays finite and tiny, the loss ~ 40.
    losses, _, _ = run("discopop", [-41.0], [-1.0], [0.0], [0.0], beta=1.0)
    close(losses, [-log_sigmoid(-40.0)])
    with pytest.raises(ValueError, match="discopop_tau"):
        run("discopop", discopop_tau=0.0)


# ---------------------------------------------------------------- bco_shift, settings


def test_bco_shift_batch_mean_reproduces_the_old_default_on_a_packed_batch():
    batch = packed_batch([make_pairs(4, seed=8)[:3], make_pairs(4, seed=8)[3:]])  # 2 padding pairs
    ref_table = jax.random.normal(jax.random.key(2), (61, 61))
    policy_table = ref_table + 0.3 * jax.random.normal(jax.random.key(3), (61, 61))

    def apply_fn(table, tokens, positions, segment_ids, **kw):
        return table[tokens]

    (pc, pr), (rc, rr) = (
        split_pairs(sequence_logps(t, batch, apply_fn=apply_fn)[0]) for t in (policy_table, ref_table)
    )
    m = np.asarray(batch["pair_mask"], np.float64)
    a, r = (np.asarray(v, np.float64) for v in (pc - rc, pr - rr))
    loss = functools.partial(preference_loss, policy_table, batch, None, apply_fn=apply_fn, frozen=ref_table)
    # Default (TRL 1.x): no shift.
    got = loss(objective=Objective(loss_type="bco_pair", beta=0.5))[0]
    close(float(got), ((-log_sigmoid(0.5 * a) - log_sigmoid(-0.5 * r)) * m).sum())
    # batch_mean: the mean implicit reward of the real pairs (padding left out), as before TRL 1.x.
    delta = (0.5 * (a + r) * m).sum() / (2 * m.sum())
    got = loss(objective=Objective(loss_type="bco_pair", beta=0.5, bco_shift="batch_mean"))[0]
    close(float(got), ((-log_sigmoid(0.5 * a - delta) - log_sigmoid(-(0.5 * r - delta))) * m).sum())


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match="bco_shift"):
        Objective(loss_type="bco_pair", bco_shift="running_mean")
    with pytest.raises(ValueError, match="discopop_tau"):
        Objective(loss_type="discopop", discopop_tau=-1.0)
    config = load_preset("dpo", "tiny")
    assert config.bco_shift == "none" and config.discopop_tau == DISCOPOP_TAU
    for loss_type in ("sigmoid_norm", "aot", "aot_unpaired", "discopop"):
        config.loss_type = loss_type
        validate(config)
    config.bco_shift = "running_mean"
    with pytest.raises(ConfigValueError, match=r"config\.bco_shift"):
        validate(config)
    config.bco_shift = "batch_mean"
    config.discopop_tau = 0.0
    with pytest.raises(ConfigValueError, match=r"config\.discopop_tau"):
        validate(config)

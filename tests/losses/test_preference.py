"""Preference losses against closed-form values worked out with scalar `math` on concrete numbers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.losses.preference import (
    DPO_LOSS_TYPES,
    LENGTH_NORMALISED_TYPES,
    dpo_loss,
    kto_kl_baseline,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

BETA = 0.1
LOG2 = math.log(2.0)

# (policy chosen, policy rejected, ref chosen, ref rejected) summed logps, all exact in float32.
# Rows: a clear win, a loss, a zero margin (policy == reference), a large win.
PC = [-10.0, -3.5, -50.0, -7.0]
PR = [-12.0, -2.25, -49.0, -30.0]
RC = [-11.0, -4.0, -50.0, -8.0]
RR = [-11.5, -1.0, -49.0, -20.0]
CHOSEN_LEN = [4, 2, 8, 1]
REJECTED_LEN = [3, 5, 8, 4]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def f32(xs) -> jax.Array:
    return jnp.asarray(xs, jnp.float32)


def close(actual, expected, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


def run_dpo(loss_type: str, pc=PC, pr=PR, rc=RC, rr=RR, **kw):
    return dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=kw.pop("beta", BETA), loss_type=loss_type, **kw)


def pairs(pc=PC, pr=PR, rc=RC, rr=RR):
    """Per pair: (a, r) = chosen and rejected log-ratios."""
    return [(c - c0, r - r0) for c, r, c0, r0 in zip(pc, pr, rc, rr, strict=True)]


# ---------------------------------------------------------------- DPO family


def test_sigmoid_closed_form_and_rewards():
    losses, cr, rj = run_dpo("sigmoid")
    close(losses, [-log_sigmoid(BETA * (a - r)) for a, r in pairs()])
    close(cr, [BETA * a for a, _ in pairs()])
    close(rj, [BETA * r for _, r in pairs()])
    # Zero margin: -log(1/2).
    assert float(losses[2]) == pytest.approx(LOG2, rel=1e-6)


@pytest.mark.parametrize("ls", [0.1, 0.25, 0.5])
def test_cdpo_label_smoothing(ls):
    losses, _, _ = run_dpo("sigmoid", label_smoothing=ls)
    expected = [-(1 - ls) * log_sigmoid(BETA * (a - r)) - ls * log_sigmoid(-BETA * (a - r)) for a, r in pairs()]
    close(losses, expected)
    assert float(losses[2]) == pytest.approx(LOG2, rel=1e-6)  # smoothing does not move the zero-margin value


def test_hinge():
    beta = 0.5  # z = beta * (a - r) crosses 1 within the cases
    losses, _, _ = run_dpo("hinge", beta=beta)
    close(losses, [max(0.0, 1.0 - beta * (a - r)) for a, r in pairs()])
    assert float(losses[3]) == 0.0 and float(losses[2]) == 1.0


def test_ipo_is_length_normalised():
    losses, cr, rj = run_dpo("ipo", chosen_lengths=jnp.asarray(CHOSEN_LEN), rejected_lengths=jnp.asarray(REJECTED_LEN))
    norm = [(a / lc, r / lr) for (a, r), lc, lr in zip(pairs(), CHOSEN_LEN, REJECTED_LEN, strict=True)]
    close(losses, [(a - r - 1 / (2 * BETA)) ** 2 for a, r in norm])
    assert float(losses[2]) == pytest.approx(25.0, rel=1e-6)  # zero margin: (1 / (2 beta))^2
    # Rewards come from the summed logps, as TRL 1.x reports them: only the loss is per token.
    close(cr, [BETA * a for a, _ in pairs()])
    close(rj, [BETA * r for _, r in pairs()])


def test_ipo_without_lengths_raises():
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        run_dpo("ipo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        run_dpo("ipo", chosen_lengths=jnp.asarray(CHOSEN_LEN))


def test_ipo_zero_length_padding_pair_is_finite():
    losses, cr, _ = run_dpo(
        "ipo", [0.0], [0.0], [0.0], [0.0], chosen_lengths=jnp.zeros(1), rejected_lengths=jnp.zeros(1)
    )
    close(losses, [25.0])
    close(cr, [0.0])


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_robust(ls):
    losses, _, _ = run_dpo("robust", label_smoothing=ls)
    expected = [
        (-(1 - ls) * log_sigmoid(BETA * (a - r)) + ls * log_sigmoid(-BETA * (a - r))) / (1 - 2 * ls) for a, r in pairs()
    ]
    close(losses, expected)
    assert float(losses[2]) == pytest.approx(LOG2, rel=1e-6)


@pytest.mark.parametrize("ls, eps", [(0.0, 1e-3), (0.2, 0.2)])
def test_exo_pair(ls, eps):
    losses, _, _ = run_dpo("exo_pair", label_smoothing=ls)
    expected = []
    for a, r in pairs():
        z = BETA * (a - r)
        expected.append(
            sigmoid(z) * (log_sigmoid(z) - math.log(1 - eps)) + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps))
        )
    close(losses, expected)


def test_bco_pair_has_no_shift_by_default_and_takes_an_explicit_delta():
    losses, cr, rj = run_dpo("bco_pair")
    ps = pairs()
    # TRL 1.x: no reward shift.
    close(losses, [-log_sigmoid(BETA * a) - log_sigmoid(-BETA * r) for a, r in ps])
    close(cr, [BETA * a for a, _ in ps])
    close(rj, [BETA * r for _, r in ps])
    # The old default, the batch-mean reward as delta, is what passing that mean gives.
    delta = sum(BETA * a + BETA * r for a, r in ps) / (2 * len(ps))
    losses, _, _ = run_dpo("bco_pair", bco_delta=delta)
    close(losses, [-log_sigmoid(BETA * a - delta) - log_sigmoid(-(BETA * r - delta)) for a, r in ps])


def test_bco_pair_delta_carries_no_gradient():
    def total(pc):
        a = pc - f32(RC)
        delta = BETA * (a.sum() + (f32(PR) - f32(RR)).sum()) / 8  # depends on pc, yet held constant
        return run_dpo("bco_pair", pc=pc, bco_delta=delta)[0].sum()

    grad = jax.grad(total)(f32(PC))
    ps = pairs()
    delta = sum(BETA * a + BETA * r for a, r in ps) / (2 * len(ps))
    # d/dpc_i of -log_sigmoid(beta a_i - delta) with delta held constant.
    close(grad, [-BETA * sigmoid(-(BETA * a - delta)) for a, _ in ps])


def test_sppo_hard():
    losses, _, _ = run_dpo("sppo_hard")
    close(losses, [(a - 0.5 / BETA) ** 2 + (r + 0.5 / BETA) ** 2 for a, r in pairs()])
    assert float(losses[2]) == pytest.approx(50.0, rel=1e-6)


def test_nca_pair():
    losses, _, _ = run_dpo("nca_pair")
    expected = [
        -log_sigmoid(BETA * a) - 0.5 * log_sigmoid(-BETA * a) - 0.5 * log_sigmoid(-BETA * r) for a, r in pairs()
    ]
    close(losses, expected)
    assert float(losses[2]) == pytest.approx(2 * LOG2, rel=1e-6)


def test_apo_zero_and_apo_down():
    losses, _, _ = run_dpo("apo_zero")
    close(losses, [1 - sigmoid(BETA * a) + sigmoid(BETA * r) for a, r in pairs()])
    assert float(losses[2]) == pytest.approx(1.0, rel=1e-6)
    losses, _, _ = run_dpo("apo_down")
    close(losses, [sigmoid(BETA * a) + 1 - sigmoid(BETA * (a - r)) for a, r in pairs()])
    assert float(losses[2]) == pytest.approx(1.0, rel=1e-6)


def test_reference_free_zeroes_reference_in_loss_not_in_rewards():
    losses, cr, rj = run_dpo("sigmoid", reference_free=True)
    close(losses, [-log_sigmoid(BETA * (c - r)) for c, r in zip(PC, PR, strict=True)])
    close(cr, [BETA * a for a, _ in pairs()])  # rewards stay policy - reference, as in TRL
    close(rj, [BETA * r for _, r in pairs()])
    losses, _, _ = run_dpo("apo_zero", reference_free=True)
    close(losses, [1 - sigmoid(BETA * c) + sigmoid(BETA * r) for c, r in zip(PC, PR, strict=True)])
    losses, _, _ = run_dpo("sppo_hard", reference_free=True)
    close(losses, [(c - 0.5 / BETA) ** 2 + (r + 0.5 / BETA) ** 2 for c, r in zip(PC, PR, strict=True)])


def test_sigmoid_gradient_direction():
    def total(pc, pr):
        return run_dpo("sigmoid", pc=pc, pr=pr)[0].sum()

    g_c, g_r = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR))
    assert bool(jnp.all(g_c < 0)) and bool(jnp.all(g_r > 0))
    close(g_c, [-BETA * sigmoid(-BETA * (a - r)) for a, r in pairs()])
    close(g_r, [BETA * sigmoid(-BETA * (a - r)) for a, r in pairs()])
    # The reference is data: no gradient flows into it through the rewards either.
    g_ref = jax.grad(lambda rc: run_dpo("sigmoid", rc=rc)[1].sum())(f32(RC))
    close(g_ref, [0.0] * 4)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_extreme_logits_stay_finite(loss_type):
    # z = beta * (a - r) = +-7998: far past where a naive log(sigmoid(z)) overflows or hits log(0).
    pc, pr, rc, rr = [-1.0, -5000.0], [-5000.0, -1.0], [-3000.0, -1.0], [-1.0, -3000.0]
    kw = dict(chosen_lengths=jnp.ones(2), rejected_lengths=jnp.ones(2)) if loss_type in LENGTH_NORMALISED_TYPES else {}

    def total(pc):
        return run_dpo(loss_type, pc=pc, pr=pr, rc=rc, rr=rr, beta=1.0, **kw)[0].sum()

    losses, _, _ = run_dpo(loss_type, pc=pc, pr=pr, rc=rc, rr=rr, beta=1.0, **kw)
    assert bool(jnp.all(jnp.isfinite(losses))), losses
    assert bool(jnp.all(jnp.isfinite(jax.grad(total)(f32(pc)))))
    if loss_type == "sigmoid":
        close(losses, [0.0, 7998.0])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_shapes_are_kept_under_jit(loss_type):
    x = jnp.linspace(-20.0, -1.0, 6, dtype=jnp.float32).reshape(2, 3)
    lengths = dict(chosen_lengths=jnp.full((2, 3), 3), rejected_lengths=jnp.full((2, 3), 5))
    kw = lengths if loss_type in LENGTH_NORMALISED_TYPES else {}
    fn = jax.jit(functools.partial(dpo_loss, beta=BETA, loss_type=loss_type, **kw))
    outs = fn(x, x[::-1], x - 1.0, x + 0.5)
    assert [o.shape for o in outs] == [(2, 3)] * 3 and all(o.dtype == jnp.float32 for o in outs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"sigmoid.*apo_down"):
        run_dpo("kto_pair")
    with pytest.raises(ValueError, match=r"below 0\.5"):
        run_dpo("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        run_dpo("sigmoid", label_smoothing=0.6)


# ---------------------------------------------------------------- SimPO


def simpo_expected(beta, gamma, ls):
    out = []
    for c, r, lc, lr in zip(PC, PR, CHOSEN_LEN, REJECTED_LEN, strict=True):
        z = beta * (c / lc - r / lr) - gamma
        out.append(-(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z))
    return out


def run_simpo(pc=PC, **kw):
    return simpo_loss(
        f32(pc), f32(PR), chosen_lengths=jnp.asarray(CHOSEN_LEN), rejected_lengths=jnp.asarray(REJECTED_LEN), **kw
    )


@pytest.mark.parametrize("beta, gamma, ls", [(2.0, 0.0, 0.0), (2.0, 1.0, 0.0), (2.5, 0.5, 0.1)])
def test_simpo_closed_form(beta, gamma, ls):
    losses, cr, rj = run_simpo(beta=beta, gamma=gamma, label_smoothing=ls)
    close(losses, simpo_expected(beta, gamma, ls))
    close(cr, [beta * c / n for c, n in zip(PC, CHOSEN_LEN, strict=True)])
    close(rj, [beta * r / n for r, n in zip(PR, REJECTED_LEN, strict=True)])


def test_simpo_gamma_shifts_the_margin():
    # With gamma, a pair needs beta * margin = gamma to reach the zero-margin value log 2.
    losses, _, _ = simpo_loss(
        f32([-6.0]),
        f32([-9.0]),
        chosen_lengths=jnp.asarray([2]),
        rejected_lengths=jnp.asarray([3]),
        beta=2.0,
        gamma=0.0,
    )
    shifted, _, _ = simpo_loss(
        f32([-6.0]),
        f32([-9.0]),
        chosen_lengths=jnp.asarray([2]),
        rejected_lengths=jnp.asarray([3]),
        beta=2.0,
        gamma=3.0,
    )
    close(losses, [LOG2])  # averages -3 and -3: zero margin
    close(shifted, [-log_sigmoid(-3.0)])
    g = jax.grad(lambda pc: run_simpo(pc, beta=2.0, gamma=1.0)[0].sum())(f32(PC))
    assert bool(jnp.all(g < 0))


# ---------------------------------------------------------------- ORPO


def log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


def orpo_expected(ac, ar, beta):
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return -beta * log_sigmoid(log_odds), log_odds


def test_orpo_closed_form():
    losses, cr, rj, log_odds = orpo_loss(
        f32(PC), f32(PR), chosen_lengths=jnp.asarray(CHOSEN_LEN), rejected_lengths=jnp.asarray(REJECTED_LEN), beta=BETA
    )
    acs = [c / n for c, n in zip(PC, CHOSEN_LEN, strict=True)]
    ars = [r / n for r, n in zip(PR, REJECTED_LEN, strict=True)]
    expected = [orpo_expected(ac, ar, BETA) for ac, ar in zip(acs, ars, strict=True)]
    close(losses, [e[0] for e in expected])
    close(log_odds, [e[1] for e in expected])
    close(cr, [BETA * x for x in acs])
    close(rj, [BETA * x for x in ars])
    assert bool(jnp.all(losses > 0))


def test_orpo_logps_near_zero_are_accurate_and_finite():
    # Average logps of -1e-7 and -3e-7: 1 - e^x cancels in float32, where log1p(-exp(x)) would be off by ~1%.
    ac, ar = float(np.float32(-1e-7)), float(np.float32(-3e-7))
    losses, _, _, log_odds = orpo_loss(
        f32([ac, ar, -2.0]), f32([-2.0, ac, ar]), chosen_lengths=jnp.ones(3), rejected_lengths=jnp.ones(3), beta=BETA
    )
    expected = [orpo_expected(ac, -2.0, BETA), orpo_expected(ar, ac, BETA), orpo_expected(-2.0, ar, BETA)]
    close(log_odds, [e[1] for e in expected], rtol=1e-6, atol=1e-5)
    close(losses, [e[0] for e in expected], rtol=1e-5, atol=1e-7)


def test_orpo_padding_pair_is_finite():
    # A padding pair: logps 0 over 0 tokens. Naively log(1 - e^0) = -inf and the pair is nan.
    def total(pc, pr):
        return orpo_loss(pc, pr, chosen_lengths=jnp.zeros(1), rejected_lengths=jnp.zeros(1), beta=BETA)[0].sum()

    close(total(f32([0.0]), f32([0.0])), BETA * LOG2)
    grads = jax.grad(total, argnums=(0, 1))(f32([0.0]), f32([0.0]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    g = jax.grad(total)(f32([-1e-6]), f32([-40.0]))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_orpo_gradient_direction():
    def total(pc, pr):
        return orpo_loss(
            pc, pr, chosen_lengths=jnp.asarray(CHOSEN_LEN), rejected_lengths=jnp.asarray(REJECTED_LEN), beta=BETA
        )[0].sum()

    g_c, g_r = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR))
    assert bool(jnp.all(g_c < 0)) and bool(jnp.all(g_r > 0))


# ---------------------------------------------------------------- KTO


def test_kto_desirable_undesirable_mix():
    policy, ref = [-10.0, -12.0, -3.0, -40.0], [-11.0, -11.0, -3.0, -30.0]
    desirable = [True, False, True, False]
    beta, kl, wd, wu = 0.5, 0.75, 1.0, 1.25
    losses, rewards = kto_loss(f32(policy), f32(ref), jnp.asarray(desirable), kl, beta=beta, undesirable_weight=wu)
    expected = []
    for p, r, d in zip(policy, ref, desirable, strict=True):
        a = p - r
        expected.append(wd * (1 - sigmoid(beta * (a - kl))) if d else wu * (1 - sigmoid(beta * (kl - a))))
    close(losses, expected)
    close(rewards, [beta * (p - r) for p, r in zip(policy, ref, strict=True)])
    # 0/1 labels and a 0-d array kl give the same numbers.
    again, _ = kto_loss(f32(policy), f32(ref), jnp.asarray([1, 0, 1, 0]), f32(kl), beta=beta, undesirable_weight=wu)
    close(again, expected)


def test_kto_gradient_direction_and_kl_is_constant():
    desirable = jnp.asarray([True, False])

    def total(policy, kl):
        return kto_loss(policy, f32([-5.0, -5.0]), desirable, kl, beta=0.5)[0].sum()

    g_policy, g_kl = jax.grad(total, argnums=(0, 1))(f32([-5.0, -5.0]), f32(0.2))
    assert float(g_policy[0]) < 0 < float(g_policy[1])  # raise desirable, lower undesirable
    assert float(g_kl) == 0.0


def test_kto_kl_baseline_masked_mean_and_clamp():
    policy, ref, mask = [-4.0, -6.0, -1.0, 100.0], [-5.0, -6.5, -3.0, 0.0], [1, 1, 1, 0]
    kl = kto_kl_baseline(f32(policy), f32(ref), jnp.asarray(mask))
    assert kl.shape == ()
    close(kl, (1.0 + 0.5 + 2.0) / 3)  # the masked row does not count
    # A negative mean clamps to 0, as does an all-masked batch.
    close(kto_kl_baseline(f32([-5.0, -6.0]), f32([-4.0, -6.5]), jnp.ones(2)), 0.0)
    close(kto_kl_baseline(f32([1.0]), f32([0.0]), jnp.zeros(1)), 0.0)
    g = jax.grad(lambda p: kto_kl_baseline(p, f32(ref), jnp.asarray(mask)))(f32(policy))
    close(g, [0.0] * 4)

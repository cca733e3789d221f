"""Per-example preference-optimisation losses: the DPO family, SimPO, ORPO and KTO.

Every function here is a pure formula over per-example arrays (any shape, usually [N]) and returns
per-example arrays of the same shape, in float32. Batching, masking and reduction belong to the caller,
which sums with its masks, so nothing here depends on how pairs fall into microbatches (except aot and
aot_unpaired, which rank pairs against each other: see `dpo_loss`). The DPO family follows TRL 1.x's
DPOTrainer (read from trl 1.16.0), the others TRL's CPOTrainer / ORPOTrainer / KTOTrainer; the few
deviations are marked "Unlike TRL".

Notation: pc, pr are the policy's log-probabilities of the chosen and rejected completions (sums over
completion tokens), rc, rr the reference model's; s = log_sigmoid, sig = sigmoid, b = beta; |yc|, |yr|
the completions' token counts.

    a = pc - rc,  r = pr - rr                      (chosen / rejected log-ratios)
    z = b * (a - r)                                (the DPO logit)
    rewards: chosen = b * a, rejected = b * r      (implicit rewards from summed logps, stop-gradient)

DPO loss types (`DPO_LOSS_TYPES`), with label smoothing ls:
    sigmoid       DPO (Rafailov et al. 2023); ls > 0 is cDPO:  -(1 - ls) s(z) - ls s(-z)
    sigmoid_norm  DPO on per-token log-ratios: the sigmoid loss with a, r replaced by a/|yc|, r/|yr|
    hinge         SLiC-HF (Zhao et al. 2023):                   relu(1 - z)
    ipo           IPO (Azar et al. 2023) on per-token log-ratios:  ((a/|yc| - r/|yr|) - 1 / (2 b))^2
    robust        robust DPO (Chowdhury et al. 2024):           (-(1 - ls) s(z) + ls s(-z)) / (1 - 2 ls)
    exo_pair      EXO (Ji et al. 2024), eps = ls or 1e-3:  sig(z) (s(z) - log(1 - eps)) + sig(-z) (s(-z) - log eps)
    bco_pair      BCO (Jung et al. 2024), shift delta (0 in TRL 1.x):  -s(b a - delta) - s(-(b r - delta))
    sppo_hard     SPPO, hard labels (Wu et al. 2024):           (a - 1 / (2 b))^2 + (r + 1 / (2 b))^2
    nca_pair      NCA (Chen et al. 2024):                       -s(b a) - s(-b a) / 2 - s(-b r) / 2
    apo_zero      APO-zero (D'Oosterlinck et al. 2024):         1 - sig(b a) + sig(b r)
    apo_down      APO-down:                                     sig(b a) + 1 - sig(b (a - r))
    aot           AOT (Melnyk et al. 2024), paired: the sigmoid loss of b * (sort(pc - pr)_k - sort(rc - rr)_k)
    aot_unpaired  AOT, unpaired: the sigmoid loss of b * (sort(a)_k - sort(r)_k)
    discopop      DiscoPOP (Lu et al. 2024), m = sig(z / tau):  -(1 - m) s(z) + m e^-z

AOT sorts across the batch: slot k pairs the k-th smallest values of the two sorted sets, so it is a
batch-level loss; see `dpo_loss` for how padding pairs are kept out of the sort.

Unlike TRL 1.x: sigmoid and sigmoid_norm keep cDPO's label smoothing (TRL 1.x's sigmoid ignores
label_smoothing; with the default 0 the two agree), exo_pair with ls = 0 uses the paper's eps = 1e-3
(TRL 1.x refuses ls = 0), and `reference_free` (which TRL 1.x dropped) is kept.

SimPO (Meng et al. 2024), reference-free on average log-probabilities pc/|yc|, pr/|yr|:
    z = b (pc/|yc| - pr/|yr|) - gamma;  loss = -(1 - ls) s(z) - ls s(-z);  rewards = b * average logps
ORPO (Hong et al. 2024), on average log-probabilities ac, ar:
    log_odds = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar));  loss = -b s(log_odds)   (added to the chosen NLL)
KTO (Ethayarajh et al. 2024), unpaired; a = policy - reference logp, kl = clamped batch KL estimate:
    desirable:   w_d (1 - sig(b (a - kl)));   undesirable:  w_u (1 - sig(b (kl - a)));   rewards = b a

Hyperparameters (beta, gamma, label_smoothing, weights, loss_type) are Python numbers fixed at trace time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "aot",
    "aot_unpaired",
    "discopop",
)
# Types whose log-ratios are divided by their completions' token counts: they need the lengths.
LENGTH_NORMALISED_TYPES = ("ipo", "sigmoid_norm")
# Types that score each log-ratio on its own rather than through the margin a - r.
_PER_RATIO_TYPES = ("bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")
DISCOPOP_TAU = 0.05  # TRL's default, the DiscoPOP paper's value.

_EXO_DEFAULT_EPSILON = 1e-3  # The EXO paper's value when label_smoothing is 0: log(0) would make the loss infinite.
# Largest average log-probability ORPO uses: log(1 - e^x) is -inf at x = 0 (a padding pair, or a
# completion the model is certain of); -1e-30 keeps it finite (about -69) without changing any real value.
_ORPO_MAX_LOGP = -1e-30


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _per_token(logps: jax.Array, lengths: jax.Array) -> jax.Array:
    # A padding example has 0 tokens and logp 0; dividing by at least 1 keeps it at 0 instead of nan,
    # which the caller's mask could not remove (nan * 0 = nan).
    return _f32(logps) / jnp.maximum(_f32(lengths), 1.0)


def _smoothed_sigmoid(z: jax.Array, label_smoothing: float) -> jax.Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _check_label_smoothing(label_smoothing: float, upper: float, what: str) -> None:
    if not 0.0 <= label_smoothing <= upper:
        raise ValueError(f"{what}: label_smoothing must be in [0, {upper}], got {label_smoothing}")


def _check_dpo_args(loss_type: str, label_smoothing: float, has_lengths: bool, discopop_tau: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
    # Beyond 1/2 the smoothed labels flip; robust DPO divides by 1 - 2 ls, so 1/2 itself is out too.
    _check_label_smoothing(label_smoothing, 0.5, f"DPO loss_type={loss_type!r}")
    if loss_type == "robust" and label_smoothing == 0.5:
        raise ValueError("robust DPO divides by 1 - 2 * label_smoothing: label_smoothing must be below 0.5")
    if loss_type in LENGTH_NORMALISED_TYPES and not has_lengths:
        raise ValueError(
            f"loss_type={loss_type!r} is length-normalised: pass chosen_lengths and rejected_lengths "
            "(completion token counts per example)"
        )
    if loss_type == "discopop" and not discopop_tau > 0:
        raise ValueError(f"discopop divides by discopop_tau: it must be positive, got {discopop_tau}")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    reference_free: bool = False,
    bco_delta: jax.Array | float | None = None,
    pair_mask: jax.Array | None = None,
    discopop_tau: float = DISCOPOP_TAU,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses, chosen_rewards, rejected_rewards) per pair; see the module docstring for each loss_type.

    logps are sums over completion tokens. `ipo` and `sigmoid_norm` need `chosen_lengths` /
    `rejected_lengths` (completion token counts): like TRL they divide each log-ratio by them. Rewards are
    always b * (policy - reference) of the summed logps, as TRL 1.x reports them for every type (ipo
    included), also with `reference_free` (pass zeros as reference logps when there is no reference model).

    `reference_free` sets the reference logps to 0 inside the loss, for every loss type.

    `bco_delta` is BCO's reward shift, stop-gradient'ed here. None (the default) is no shift, as in TRL 1.x,
    which dropped the running mean of the batch reward that older TRL subtracted; a caller that wants that
    shift passes its own delta (see `align_jax.losses.dpo`'s bco_shift="batch_mean").

    `pair_mask` (1 = a real pair, 0 = padding; default all real) matters to aot and aot_unpaired only:
    they sort values across the whole array, and padding must not take part. Padding sorts after every
    real pair in both orders, so the n real pairs fill slots 0..n-1 of each sort and meet only each other.
    Slot k's loss is reported at the pair whose first sorted value (pc - pr for aot, a for aot_unpaired)
    holds rank k, so summing losses over the real pairs gives TRL's sum over slots, and each policy
    log-ratio's gradient stays at its own pair. Padding entries come out finite, for the caller to mask.

    `discopop_tau` is DiscoPOP's temperature (TRL's default 0.05).
    """
    _check_dpo_args(
        loss_type, label_smoothing, chosen_lengths is not None and rejected_lengths is not None, discopop_tau
    )
    pc, pr, rc, rr = (
        _f32(x) for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))

    if reference_free:
        rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
    a, r = pc - rc, pr - rr  # chosen / rejected log-ratios
    if loss_type in LENGTH_NORMALISED_TYPES:
        a, r = _per_token(a, chosen_lengths), _per_token(r, rejected_lengths)

    if loss_type in _PER_RATIO_TYPES:
        losses = _per_ratio_loss(loss_type, a, r, beta, bco_delta)
    else:
        if loss_type == "aot":
            margin = _rank_matched_margin(pc - pr, rc - rr, pair_mask)
        elif loss_type == "aot_unpaired":
            margin = _rank_matched_margin(a, r, pair_mask)
        else:
            margin = a - r
        losses = _margin_loss(loss_type, margin, beta, label_smoothing, discopop_tau)
    return losses, chosen_rewards, rejected_rewards


def _margin_loss(loss_type: str, margin: jax.Array, beta: float, label_smoothing: float, tau: float) -> jax.Array:
    """Types that depend on the pair only through its log-ratio margin (a - r, or AOT's matched one)."""
    z = beta * margin
    ls = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm", "aot", "aot_unpaired"):
        return _smoothed_sigmoid(z, ls)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    if loss_type == "ipo":
        # Eq. 17 of the IPO paper; beta plays tau, the regularisation strength.
        return jnp.square(margin - 1.0 / (2.0 * beta))
    if loss_type == "robust":
        return (-(1.0 - ls) * jax.nn.log_sigmoid(z) + ls * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * ls)
    if loss_type == "exo_pair":
        # Eq. 16 of EXO: reverse KL from the model's pair probabilities (sig(z), sig(-z)) to the smoothed
        # labels (1 - eps, eps); eps > 0 keeps log(eps) finite.
        eps = ls or _EXO_DEFAULT_EPSILON
        return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
            jax.nn.log_sigmoid(-z) - math.log(eps)
        )
    # discopop, Eq. 5 of the paper: a logistic loss blended into an exponential one as z grows. 1 - m is
    # written sig(-z / tau), and m e^-z as exp(s(z / tau) - z): the same values, but for z << 0 e^-z
    # overflows where m underflows to 0, and inf * 0 would be nan; this form stays finite for tau <= 1.
    return -jax.nn.sigmoid(-z / tau) * jax.nn.log_sigmoid(z) + jnp.exp(jax.nn.log_sigmoid(z / tau) - z)


def _per_ratio_loss(
    loss_type: str, a: jax.Array, r: jax.Array, beta: float, bco_delta: jax.Array | float | None
) -> jax.Array:
    """Types that score the chosen and rejected log-ratios a, r each on its own (cr, rj: their rewards)."""
    cr, rj = beta * a, beta * r
    if loss_type == "bco_pair":
        delta = 0.0 if bco_delta is None else jax.lax.stop_gradient(_f32(bco_delta))
        return -jax.nn.log_sigmoid(cr - delta) - jax.nn.log_sigmoid(-(rj - delta))
    if loss_type == "sppo_hard":
        # SPPO with the win probability set to 1 for the chosen and 0 for the rejected completion.
        return jnp.square(a - 0.5 / beta) + jnp.square(r + 0.5 / beta)
    if loss_type == "nca_pair":
        return -jax.nn.log_sigmoid(cr) - 0.5 * jax.nn.log_sigmoid(-cr) - 0.5 * jax.nn.log_sigmoid(-rj)
    if loss_type == "apo_zero":
        # Chosen outputs are better than the model's own: push the chosen up and the rejected down.
        # 1 - sig(x) is written sig(-x): the same value without cancellation when sig(x) is near 1.
        return jax.nn.sigmoid(-cr) + jax.nn.sigmoid(rj)
    # apo_down: chosen outputs are worse than the model's own: push both down, the rejected more.
    return jax.nn.sigmoid(cr) + jax.nn.sigmoid(-beta * (a - r))


def _rank_matched_margin(x: jax.Array, y: jax.Array, pair_mask: jax.Array | None) -> jax.Array:
    """x_i minus the y that holds x_i's rank among the real pairs: AOT's sorted difference, slot k
    reported at the pair whose x is k-th smallest. Padding sorts last (its sort key is +inf), so real
    pairs only meet real pairs; the gathered values themselves stay finite, and the integer ranks carry
    no gradient, so gradients reach x directly and y through the gather."""
    shape = x.shape
    x, y = x.reshape(-1), y.reshape(-1)
    real = jnp.ones(x.shape, bool) if pair_mask is None else jnp.asarray(pair_mask).reshape(-1) > 0
    x_order = jnp.argsort(jnp.where(real, x, jnp.inf), stable=True)
    y_sorted = y[jnp.argsort(jnp.where(real, y, jnp.inf), stable=True)]
    x_rank = jnp.zeros_like(x_order).at[x_order].set(jnp.arange(x.size, dtype=x_order.dtype))
    return (x - y_sorted[x_rank]).reshape(shape)


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses, chosen_rewards, rejected_rewards) of SimPO (TRL's CPOTrainer with loss_type="simpo").

    logps are sums over completion tokens; SimPO uses their per-token averages, so no reference model is
    needed. `gamma` is the target reward margin: TRL subtracts gamma / beta from the average-logp margin
    before multiplying by beta, i.e. z = beta * margin - gamma. Rewards are beta * average logps."""
    _check_label_smoothing(label_smoothing, 0.5, "SimPO")
    ac = _per_token(policy_chosen_logps, chosen_lengths)
    ar = _per_token(policy_rejected_logps, rejected_lengths)
    z = beta * ((ac - ar) - gamma / beta)
    losses = _smoothed_sigmoid(z, label_smoothing)
    return losses, jax.lax.stop_gradient(beta * ac), jax.lax.stop_gradient(beta * ar)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x <= 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0, where
    1 - e^x cancels, and log1p(-e^x) further out. Each branch sees a harmless stand-in where it is not
    used, so its gradient there is finite and jnp.where does not turn 0 * inf into nan."""
    x = jnp.minimum(x, _ORPO_MAX_LOGP)
    near_zero = x > -math.log(2.0)
    small = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
    large = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
    return jnp.where(near_zero, small, large)


def orpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(losses, chosen_rewards, rejected_rewards, log_odds_ratio) of ORPO (TRL's ORPOTrainer).

    logps are sums over completion tokens; ORPO uses their per-token averages. `losses` is
    -beta * log_sigmoid(log_odds_ratio) >= 0, the term the caller ADDS to the chosen completion's NLL.
    (TRL's `odds_ratio_loss` returns the opposite sign, beta * log_sigmoid(...), and subtracts its mean
    from the NLL: the same total.) `log_odds_ratio` is log(odds(chosen) / odds(rejected)) per pair,
    stop-gradient, for metrics (TRL logs its mean as `log_odds_chosen`, and the mean of log_sigmoid of it
    as `log_odds_ratio`). Rewards are beta * average logps."""
    ac = _per_token(policy_chosen_logps, chosen_lengths)
    ar = _per_token(policy_rejected_logps, rejected_lengths)
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    losses = -beta * jax.nn.log_sigmoid(log_odds)
    return (
        losses,
        jax.lax.stop_gradient(beta * ac),
        jax.lax.stop_gradient(beta * ar),
        jax.lax.stop_gradient(log_odds),
    )


def kto_kl_baseline(policy_kl_logps: jax.Array, ref_kl_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """KTO's reference point: the masked mean of policy - reference logps over the mismatched (KL)
    completions, clamped at 0 and stop-gradient, as a scalar.

    Unlike TRL, which averages each process's mean (equal weight per process whatever its count), this is
    the exact mean over the unmasked examples it is given; masked rows (padding) count for nothing."""
    m = _f32(mask) > 0
    diff = jnp.where(m, _f32(policy_kl_logps) - _f32(ref_kl_logps), 0.0)
    mean = jnp.sum(diff) / jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    desirable: jax.Array,
    kl: jax.Array | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(losses, rewards) of KTO (TRL's KTOTrainer, loss_type="kto") for unpaired examples.

    `desirable` is a bool / 0-1 array per example; `kl` the scalar baseline from `kto_kl_baseline`
    (stop-gradient'ed here as well). Rewards are beta * (policy - reference), stop-gradient."""
    logratio = _f32(policy_logps) - _f32(ref_logps)
    kl = jax.lax.stop_gradient(_f32(kl))
    # 1 - sig(x) written as sig(-x): the same value without cancellation when sig(x) is near 1.
    desirable_losses = desirable_weight * jax.nn.sigmoid(-beta * (logratio - kl))
    undesirable_losses = undesirable_weight * jax.nn.sigmoid(-beta * (kl - logratio))
    losses = jnp.where(jnp.asarray(desirable).astype(bool), desirable_losses, undesirable_losses)
    return losses, jax.lax.stop_gradient(beta * logratio)

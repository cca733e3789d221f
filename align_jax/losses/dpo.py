"""Preference-optimisation objectives on packed batches: the DPO family, SimPO, ORPO and KTO.

`preference_loss` reads the batch (align_jax/data/preference.py layout), computes each sequence's
summed response log-prob under the policy (and the reference, when the objective has one), hands the
per-pair arrays to the pure formulas of `align_jax.losses.preference`, and returns the summed loss and
the number of pairs, so the step divides once.

Reference log-probs come from one of two places:
  * `frozen`: the frozen reference params (TrainState.frozen), run forward inside the step without a
    gradient; or
  * `batch["ref_logps"]` [B, 2P]: precomputed once before training (align_jax/reference.py), per
    segment in the batch's layout.

The NLL term (RPO's `rpo_alpha`, and ORPO's own NLL) is the chosen response's mean token NLL, per pair,
summed over pairs like the rest, rather than TRL's mean over all chosen tokens of a batch: a per-pair
quantity is what keeps the loss independent of how pairs fall into microbatches. What looks across
pairs is per microbatch, as in TRL it is per device batch: KTO's KL estimate, AOT's sorts, and BCO's
reward mean when `bco_shift="batch_mean"` asks for it (TRL 1.x shifts BCO by nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.losses import preference as formulas
from align_jax.losses.pairs import pair_metrics, sequence_logps, split_pairs
from align_jax.models.apply import ApplyFn

REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = (*formulas.DPO_LOSS_TYPES, *REFERENCE_FREE, "kto")
# bco_pair's reward shift: "none" is TRL 1.x; "batch_mean" is older TRL's baseline, here the mean implicit
# reward of the microbatch's real pairs rather than a running mean across steps.
BCO_SHIFTS = ("none", "batch_mean")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Which preference loss, and its hyper-parameters (see `align_jax.losses.preference`)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO / robust / EXO (DPO types) and SimPO
    gamma: float = 0.5  # SimPO's target margin (in units of beta)
    rpo_alpha: float = 0.0  # weight of the chosen NLL on top of any DPO loss (RPO)
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0  # KTO
    reference_free: bool = False  # DPO types: reference log-ratios taken as 0
    bco_shift: str = "none"  # bco_pair: one of BCO_SHIFTS
    discopop_tau: float = formulas.DISCOPOP_TAU  # discopop's temperature

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.bco_shift not in BCO_SHIFTS:
            raise ValueError(f"bco_shift={self.bco_shift!r}; expected one of {BCO_SHIFTS}")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau={self.discopop_tau} must be positive")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (SimPO, ORPO and reference-free DPO do not)."""
        return self.loss_type not in REFERENCE_FREE and not self.reference_free

    @property
    def unpaired(self) -> bool:
        return self.loss_type == "kto"


def reference_logps(batch: dict[str, jax.Array], frozen: Any, *, apply_fn: ApplyFn, loss_chunk: int) -> jax.Array:
    """[B, 2P] reference log-prob sums: from the frozen params, else precomputed in the batch."""
    if frozen is not None:
        logps, _ = sequence_logps(frozen, batch, apply_fn=apply_fn, loss_chunk=loss_chunk)
        return jax.lax.stop_gradient(logps)
    if "ref_logps" not in batch:
        raise ValueError("the objective needs reference log-probs: give frozen params or batch['ref_logps']")
    return batch["ref_logps"]


def preference_loss(
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: ApplyFn,
    objective: Objective,
    loss_chunk: int = 0,
    frozen: Any = None,
) -> tuple[jax.Array, jax.Array, dict[str, tuple]]:
    """(summed loss over the batch's real pairs, their number, metrics as (sum, count))."""
    del rng
    o = objective
    logps, counts = sequence_logps(params, batch, apply_fn=apply_fn, loss_chunk=loss_chunk)
    ref = reference_logps(batch, frozen, apply_fn=apply_fn, loss_chunk=loss_chunk) if o.needs_reference else None
    m = batch["pair_mask"].astype(jnp.float32)
    n = m.sum()
    pc, pr = split_pairs(logps)
    lc, lr = (jnp.maximum(x, 1.0) for x in split_pairs(counts))
    nll = -pc / lc  # the chosen response's mean token NLL (absent pairs: 0 / 1)
    metrics: dict[str, tuple] = {"nll": ((nll * m).sum(), n)}

    if o.loss_type == "kto":
        losses, kto_metrics = _kto(pc, pr, ref, batch["kto_label"] > 0, m, o)
        metrics.update(kto_metrics)
        return (losses * m).sum(), n, metrics

    if o.loss_type == "simpo":
        losses, cr, rr = formulas.simpo_loss(
            pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=o.beta, gamma=o.gamma,
            label_smoothing=o.label_smoothing,
        )  # fmt: skip
    elif o.loss_type == "orpo":
        losses, cr, rr, log_odds = formulas.orpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=o.beta)
        metrics["log_odds_ratio"] = ((log_odds * m).sum(), n)
        losses = losses + nll  # ORPO = NLL + beta * odds-ratio term
    else:
        rc, rr_ref = split_pairs(jnp.zeros_like(logps) if ref is None else ref)
        bco = o.loss_type == "bco_pair" and o.bco_shift == "batch_mean"
        losses, cr, rr = formulas.dpo_loss(
            pc, pr, rc, rr_ref, beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing,
            chosen_lengths=lc, rejected_lengths=lr, reference_free=o.reference_free,
            bco_delta=_bco_delta(pc, pr, rc, rr_ref, m, o.beta) if bco else None,
            pair_mask=m, discopop_tau=o.discopop_tau,
        )  # fmt: skip
    if o.rpo_alpha:
        losses = losses + o.rpo_alpha * nll
    metrics.update(pair_metrics(cr, rr, pc, pr, m))
    return (losses * m).sum(), n, metrics


def _kto(pc, pr, ref, desirable, m, o: Objective) -> tuple[jax.Array, dict[str, tuple]]:
    """KTO's per-example losses and metrics. In the unpaired layout a pair's first member is the
    completion and its second the KL-baseline sample (so pc / pr are their policy log-probs)."""
    rc, rk = split_pairs(ref)  # the completion's and its KL sample's reference log-probs
    kl = formulas.kto_kl_baseline(pr, rk, m)
    losses, rewards = formulas.kto_loss(
        pc, rc, desirable, kl, beta=o.beta, desirable_weight=o.desirable_weight,
        undesirable_weight=o.undesirable_weight,
    )  # fmt: skip
    d = m * desirable
    u = m * (1.0 - desirable)
    n = m.sum()
    return losses, {
        "rewards/chosen": ((rewards * d).sum(), d.sum()),
        "rewards/rejected": ((rewards * u).sum(), u.sum()),
        "logps/chosen": ((pc * d).sum(), d.sum()),
        "logps/rejected": ((pc * u).sum(), u.sum()),
        "kl": (kl * n, n),
    }


def _bco_delta(pc, pr, rc, rr, m, beta) -> jax.Array:
    """bco_shift="batch_mean": the mean implicit reward of the (present) pairs, without a gradient.
    Masked here, so padding pairs in a packed batch do not pull it toward 0."""
    both = beta * ((pc - rc) * m + (pr - rr) * m)
    return jax.lax.stop_gradient(both.sum() / jnp.maximum(2 * m.sum(), 1.0))

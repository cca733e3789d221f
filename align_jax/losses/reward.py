"""Reward-model loss: Bradley-Terry on pairs plus a pointwise MSE toward absolute scores.

The Baichuan Alignment report's Eq. 1, per pair with rewards r_c, r_r (the scalar head at each
sequence's last target token) and normalised absolute scores s_c, s_r when the row has them:

    loss = -log sigmoid(r_c - r_r - margin) + alpha * [(r_c - s_c)^2 + (r_r - s_r)^2]

The MSE term anchors rewards to an absolute scale (Bradley-Terry alone only fixes differences), so
rewards of unrelated responses are comparable. Rows without scores get alpha = 0. An optional
centering term, center * (r_c + r_r)^2, keeps the rewards' mean near zero (as TRL's
`center_rewards_coefficient`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from align_jax.losses.pairs import last_target_index, split_pairs, values_at
from align_jax.models.apply import ApplyFn, forward


def pair_rewards(params: Any, batch: dict[str, jax.Array], *, apply_fn: ApplyFn) -> tuple[jax.Array, jax.Array]:
    """(chosen rewards, rejected rewards), each float32 [B, P], from one packed forward pass."""
    values = forward(apply_fn, params, batch)
    return split_pairs(values_at(values, last_target_index(batch)))


def reward_loss(
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: ApplyFn,
    margin: float = 0.0,
    score_weight: float = 0.0,
    center_weight: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, tuple]]:
    """Summed per-pair loss and the number of pairs (the step divides once)."""
    del rng
    rc, rr = pair_rewards(params, batch, apply_fn=apply_fn)
    m = batch["pair_mask"].astype(jnp.float32)
    bt = -jax.nn.log_sigmoid(rc - rr - margin)
    per_pair = bt
    scored = batch["score_mask"].astype(jnp.float32) * m
    mse = jnp.square(rc - batch["chosen_score"]) + jnp.square(rr - batch["rejected_score"])
    if score_weight:
        per_pair = per_pair + score_weight * scored * mse
    if center_weight:
        per_pair = per_pair + center_weight * jnp.square(rc + rr)
    n = m.sum()
    both = jnp.concatenate([rc * m, rr * m], axis=1)
    metrics = {
        "bt_loss": ((bt * m).sum(), n),
        "accuracy": (((rc > rr) * m).sum(), n),
        "margin": (((rc - rr) * m).sum(), n),
        "reward_mean": (both.sum(), 2 * n),
        "reward_std": (both.sum(), jnp.square(both).sum(), 2 * n),
        "score_mse": ((mse * scored).sum(), 2 * scored.sum()),
    }
    return (per_pair * m).sum(), n, metrics

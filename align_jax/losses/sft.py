"""Next-token cross-entropy on the tokens the batch marks as targets."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def target_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1] float: 1 where token t+1 is a target predicted from position t.

    `loss_mask[t] = 1` marks token t as a target; a target also needs its predecessor in the same
    (non-padding) segment, so nothing is ever predicted across a packing boundary."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (batch["loss_mask"][:, 1:] > 0) & same


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz - picked, logz


def sft_loss(
    params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: nn.Module, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    del rng  # deterministic: no dropout in these models
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets = batch["tokens"][:, 1:]
    mask = target_mask(batch).astype(jnp.float32)
    nll, logz = token_nll(logits[:, :-1], targets)
    n = mask.sum()
    nll_sum = (nll * mask).sum()
    loss_sum = nll_sum
    metrics = {"nll": (nll_sum, n)}
    if z_loss:
        z_sum = (jnp.square(logz) * mask).sum()
        loss_sum = loss_sum + z_loss * z_sum
        metrics["z_loss"] = (z_sum, n)
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == targets).astype(jnp.float32)
    metrics["accuracy"] = ((correct * mask).sum(), n)
    return loss_sum, n, metrics

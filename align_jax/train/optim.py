"""AdamW with warmup + decay, global-norm clipping, and no weight decay on norms and biases."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at `total_steps`."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    peak, floor = float(cfg.lr), float(cfg.lr) * float(cfg.min_lr_ratio)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(cfg.min_lr_ratio))
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices, not norm scales or biases (whatever their rank,
    since stacked layers give a norm scale the shape [L, E])."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in ("scale", "bias") for path in flat})


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(cfg.b1),
            b2=float(cfg.b2),
            eps=float(cfg.eps),
            weight_decay=float(cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every leaf, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))

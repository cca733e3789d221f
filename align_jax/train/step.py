"""`make_train_step(loss_fn)`: the one jitted, pure, sharded train step every stage uses.

The loss function returns sums and a denominator; the step adds them up over microbatches (a scan,
so memory holds one microbatch of activations) and divides once. The result is the same however the
examples fall into microbatches, which a mean of per-microbatch means would not be.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from align_jax.train.optim import global_norm
from align_jax.train.state import TrainState

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict[str, tuple]]]


def _split_microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches")
        # Strided split (row i goes to microbatch i % n): each microbatch then takes rows from every
        # data shard, so the reshape needs no cross-device shuffle.
        return x.reshape((x.shape[0] // n, n, *x.shape[1:])).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate(loss_fn: LossFn, params: Any, batch: dict[str, jax.Array], rng: jax.Array, microbatches: int):
    """Sums of (loss, weight, metrics) and of the gradient of the loss sum, over microbatches."""
    grad_fn = jax.value_and_grad(lambda p, b, r: _pack(loss_fn(p, b, r)), has_aux=True)
    if microbatches == 1:
        (loss_sum, (weight, metrics)), grads = grad_fn(params, batch, rng)
        return loss_sum, weight, metrics, grads

    micro = _split_microbatches(batch, microbatches)
    rngs = jax.random.split(rng, microbatches)

    def body(carry, xs):
        mb, r = xs
        (loss_sum, (weight, metrics)), grads = grad_fn(params, mb, r)
        return jax.tree.map(jnp.add, carry, (loss_sum, weight, metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rngs[0]))
    (loss_shape, (weight_shape, metric_shapes)), grad_shapes = shapes
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        (loss_shape, weight_shape, metric_shapes, grad_shapes),
    )
    zeros = (*zeros[:3], jax.tree.map(lambda z, p: z.astype(p.dtype), zeros[3], params))
    (loss_sum, weight, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
    return loss_sum, weight, metrics, grads


def _pack(out):
    loss_sum, weight, metrics = out
    return loss_sum.astype(jnp.float32), (weight.astype(jnp.float32), metrics)


def finalize_metrics(metrics: dict[str, tuple]) -> dict[str, jax.Array]:
    """(sum, count) -> the mean; (sum, sum of squares, count) -> the standard deviation. Both kinds add
    up across microbatches, so they are exact however the examples were split."""
    out = {}
    for k, v in metrics.items():
        if len(v) == 3:
            s, sq, c = v
            c = jnp.maximum(c, 1e-9)
            out[k] = jnp.sqrt(jnp.maximum(sq / c - jnp.square(s / c), 0.0))
        else:
            s, c = v
            out[k] = s / jnp.maximum(c, 1e-9)
    return out


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, batch) -> (state, metrics). A step whose loss or gradient is not finite leaves
    params and optimizer state unchanged and reports `finite = 0`; the loop stops on it.

    When the state carries a frozen reference (DPO, GRPO), the loss is called with `frozen=state.frozen`.
    The gradient is taken with respect to `params` only, so the reference is never updated."""

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        fn = loss_fn if state.frozen is None else functools.partial(loss_fn, frozen=state.frozen)
        loss_sum, weight, metric_sums, grad_sums = accumulate(fn, state.params, batch, step_rng, microbatches)
        denom = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grad_sums)
        loss = loss_sum / denom
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Keep the last good values when the step went non-finite.
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        metrics = {"loss": loss, "grad_norm": grad_norm, "weight": weight, "finite": finite.astype(jnp.int32)}
        metrics.update(finalize_metrics(metric_sums))
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,) if donate else (),
    )


def make_eval_step(
    loss_fn: LossFn, *, state_shardings: Any = None, batch_shardings: Any = None
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[jax.Array, jax.Array, dict[str, tuple]]]:
    """eval_step(state, batch) -> (loss_sum, weight, metric sums) of one batch, with the frozen reference
    when the state carries one; the caller adds these up over the eval split and divides once. Nothing
    is donated: the state goes on training."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        kwargs = {} if state.frozen is None else {"frozen": state.frozen}
        return loss_fn(state.params, batch, jax.random.key(0), **kwargs)

    if state_shardings is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings))

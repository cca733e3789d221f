"""What losses call a model through: a pure function of (params, arrays).

Losses take an `ApplyFn` rather than a Flax module, so they are formulas over arrays that any model with
this signature (a decoder, a scalar head, a test's stand-in) can feed.

Mixture-of-experts decoders also produce a load-balancing loss, which the loss formulas do not know
about: `router_aux_scope(params)` (used by `losses.router_aux.with_router_aux`) opens a scope in which
every forward of exactly those params (or a part of them: the RM's decoder) records the mean over
layers of the sown per-layer losses.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

# apply_fn(params, tokens [B,T], positions [B,T], segment_ids [B,T], **kw) -> outputs. A decoder's returns
# logits [B,T,V], or its final hidden states [B,T,E] with return_hidden=True; a scalar model's [B,T] values.
# `apply_fn.final_softcap` is the cap a caller must apply to logits it computes from the hidden states.
ApplyFn = Callable[..., jax.Array]


class _AuxRecord:
    def __init__(self, params: Any):
        self.params, self.values = params, []

    def owns(self, params: Any) -> bool:
        """`params` is the trained tree or one of its parts (the RM's "decoder", PPO's "policy")."""
        if params is self.params:
            return True
        return isinstance(self.params, dict) and any(params is part for part in self.params.values())

    def mean(self) -> jax.Array:
        return sum(self.values) / len(self.values) if self.values else jnp.zeros((), jnp.float32)


_SCOPE: contextvars.ContextVar[_AuxRecord | None] = contextvars.ContextVar("router_aux_scope", default=None)


@contextlib.contextmanager
def router_aux_scope(params: Any) -> Iterator[_AuxRecord]:
    """Records the router load-balancing loss of every forward of `params` (the same object: a frozen
    reference's forward is not a policy's) inside the block; `.mean()` averages over those forwards."""
    record = _AuxRecord(params)
    token = _SCOPE.set(record)
    try:
        yield record
    finally:
        _SCOPE.reset(token)


def _sown_mean(intermediates: Any) -> jax.Array:
    """Mean over layers of the sown `router_aux_loss` values (stacked [L/k, k] by the layer scan)."""
    leaves = [jnp.mean(x) for x in jax.tree.leaves(intermediates)]
    return sum(leaves) / len(leaves) if leaves else jnp.zeros((), jnp.float32)


def apply_fn(module: nn.Module) -> ApplyFn:
    """`module.apply` with the params as a plain first argument. `rngs` (e.g. {"dropout": key}) turns
    on LoRA dropout."""
    cfg = getattr(module, "cfg", None)
    routed = bool(getattr(cfg, "num_experts", 0))

    def apply(
        params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, rngs=None, **kwargs
    ) -> jax.Array:
        record = _SCOPE.get()
        if routed and record is not None and record.owns(params):
            out, state = module.apply(
                {"params": params}, tokens, positions, segment_ids, rngs=rngs, mutable=["intermediates"], **kwargs
            )
            record.values.append(_sown_mean(state.get("intermediates", {})))
            return out
        return module.apply({"params": params}, tokens, positions, segment_ids, rngs=rngs, **kwargs)

    apply.final_softcap = getattr(cfg, "final_softcap", None)
    return apply


def forward(apply: ApplyFn, params: Any, batch: dict[str, jax.Array], **kwargs) -> jax.Array:
    """apply_fn over a batch's token fields."""
    return apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], **kwargs)

"""What losses call a model through: a pure function of (params, arrays).

Losses take an `ApplyFn` rather than a Flax module, so they are formulas over arrays that any model with
this signature (a decoder, a scalar head, a test's stand-in) can feed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn

# apply_fn(params, tokens [B,T], positions [B,T], segment_ids [B,T], **kw) -> outputs. A decoder's returns
# logits [B,T,V], or its final hidden states [B,T,E] with return_hidden=True; a scalar model's [B,T] values.
ApplyFn = Callable[..., jax.Array]


def apply_fn(module: nn.Module) -> ApplyFn:
    """`module.apply` with the params as a plain first argument."""

    def apply(params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, **kwargs) -> jax.Array:
        return module.apply({"params": params}, tokens, positions, segment_ids, **kwargs)

    return apply


def forward(apply: ApplyFn, params: Any, batch: dict[str, jax.Array], **kwargs) -> jax.Array:
    """apply_fn over a batch's token fields."""
    return apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], **kwargs)

"""The train state: one pytree that is sharded, donated, checkpointed and restored whole."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """step, params, optimizer state and rng. `rng` is raw uint32 key data, which Orbax stores as a
    plain array. DPO/GRPO add a frozen reference in `frozen`: it rides along (sharded like params)
    but never reaches the optimizer."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    @classmethod
    def create(cls, params: Any, optimizer, seed: int, frozen: Any = None) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
            frozen=frozen,
        )

"""A scalar head (reward or value) on the decoder's final hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from align_jax.models.config import ModelConfig
from align_jax.models.transformer import Decoder
from align_jax.sharding import Sharder


class ScalarHead(nn.Module):
    """hidden [B, T, E] -> one float32 value per token [B, T].

    Computed in float32 whatever the compute dtype: rewards are compared across sequences, and bf16
    rounding of a scalar that sums E products is large enough to flip close pairs."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden_BTE: jax.Array) -> jax.Array:
        e = self.cfg.hidden_size
        init = nn.initializers.normal(stddev=1.0 / (e + 1) ** 0.5)
        w = self.param("kernel", nn.with_logical_partitioning(init, ("embed",)), (e,), self.cfg.jnp_param_dtype)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), self.cfg.jnp_param_dtype)
        return jnp.einsum("bte,e->bt", hidden_BTE.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)


class ScalarModel(nn.Module):
    """Decoder + ScalarHead: a reward model or a value model. Params: {'decoder': ..., 'head': ...},
    so a causal-LM checkpoint loads into 'decoder' (its `lm_head` is not used) and the head starts fresh."""

    cfg: ModelConfig
    sharder: Sharder = Sharder()

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, segment_ids_BT) -> jax.Array:
        hidden = Decoder(self.cfg, self.sharder, name="decoder")(
            tokens_BT, positions_BT, segment_ids_BT, return_hidden=True
        )
        return ScalarHead(self.cfg, name="head")(hidden)

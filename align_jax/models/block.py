"""One decoder layer (`Block`): attention, then the MLP (dense or routed experts), each on the residual
stream behind a pre-norm; Gemma 2/3 also norm each sublayer's output (`cfg.sandwich_norms`).

The signature is nn.scan's (carry, broadcast inputs, scanned inputs) -> (carry, None). The carry is the
residual stream; with a cache (`mode` set) it is (stream, cache), and the cache's "layer" counter
advances by one per Block. `side` is what every layer shares (positions, masks, the real-token mask);
`is_local` is this layer's one scanned input: whether it is a sliding-window layer (Gemma).

A mixture-of-experts layer sows its load-balancing loss into the "intermediates" collection
(`router_aux_loss`, one value per layer); `models.apply.apply_fn(..., return_aux=True)` collects it.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

from align_jax.models.config import ModelConfig
from align_jax.models.layers import BTE, Attention, Mlp, RMSNorm
from align_jax.models.moe import MoeMlp
from align_jax.sharding import Sharder


class Block(nn.Module):
    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, carry, side: dict[str, Any], is_local: Any = False, cache_index=None):
        cfg = self.cfg
        x_BTE, cache = (carry, None) if self.mode is None else carry
        h = RMSNorm(cfg, name="input_norm")(x_BTE)
        attn = Attention(cfg, self.sharder, self.mode, name="attn")
        if cache is None:
            out = attn(h, side, is_local)
        else:
            out, cache = attn(h, side, is_local, cache, cache_index)
            cache = {**cache, "layer": cache["layer"] + 1}
        if cfg.sandwich_norms:
            out = RMSNorm(cfg, name="attn_out_norm")(out)
        x_BTE = x_BTE + out
        h = RMSNorm(cfg, name="post_attn_norm")(x_BTE)
        if cfg.num_experts:
            out, aux = MoeMlp(cfg, self.sharder, name="mlp")(h, side["token_mask"])
            self.sow("intermediates", "router_aux_loss", aux)
        else:
            out = Mlp(cfg, self.sharder, fuse_gate_up=self.mode != "decode", name="mlp")(h)
        if cfg.sandwich_norms:
            out = RMSNorm(cfg, name="mlp_out_norm")(out)
        x_BTE = self.sharder.constrain(x_BTE + out, BTE)
        return (x_BTE if cache is None else (x_BTE, cache)), None

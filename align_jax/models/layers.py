"""The decoder's building blocks, up to one decoder layer (`Block`).

Leaf modules declare their own params with logical axis names (RMSNorm, Linear, LinearWeights,
Embedding, LmHead); Attention and Mlp compose them; Block is one pre-norm layer (attention, then the
SwiGLU MLP, each on the residual stream). The layer stack that scans Blocks lives in layer_stack.py and
the model around it in transformer.py.

With a KV cache (`mode` "prefill" or "decode"), Attention and Block also carry the cache: see
transformer.py's module docstring for how it rides in the layer scan.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from align_jax.models.attention import attention, cached_attention, write_cache
from align_jax.models.config import ModelConfig
from align_jax.models.rope import apply_rope, inv_frequencies
from align_jax.sharding import Sharder

BTE = ("activation_batch", "activation_length", "activation_embed")
CACHE_NAMES = (None, "activation_batch", "activation_kv_heads", None, None)  # [L, B, K, S, H]


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> jax.Array:
    cfg: ModelConfig = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)


def _normal(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


def _bcast(b: jax.Array, ndim: int) -> jax.Array:
    """Left-pads a bias/scale with unit axes (rank promotion is an error in this project)."""
    return b.reshape((1,) * (ndim - b.ndim) + b.shape)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        dtype = self.cfg.jnp_dtype
        return _bcast(scale.astype(dtype), x.ndim) * y.astype(dtype)


class Linear(nn.Module):
    """A projection whose kernel keeps the logical shape (e.g. [E, N, H]) instead of a flat matrix."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str  # einsum of (input, kernel)
    n_in: int = 1  # leading kernel dims that are contracted; the bias has the rest
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.cfg.jnp_dtype
        w = _param(self, "kernel", self.shape, self.axes, _normal(self.cfg))
        y = jnp.einsum(self.equation, x, w.astype(dtype))
        if self.use_bias:
            b = _param(self, "bias", self.shape[self.n_in :], self.axes[self.n_in :], nn.initializers.zeros)
            y = y + _bcast(b.astype(dtype), y.ndim)
        return y


class LinearWeights(nn.Module):
    """A `Linear`'s kernel and bias (None without one), declared but not applied."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        w = _param(self, "kernel", self.shape, self.axes, _normal(self.cfg))
        b = _param(self, "bias", self.shape[1:], self.axes[1:], nn.initializers.zeros) if self.use_bias else None
        return w, b


class Embedding(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.cfg.vocab_size, self.cfg.hidden_size)
        return _param(self, "embedding", shape, ("vocab", "embed"), _normal(self.cfg))


class LmHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.cfg.hidden_size, self.cfg.vocab_size)
        return _param(self, "kernel", shape, ("embed", "vocab"), _normal(self.cfg))


def constrain_cache(sharder: Sharder, cache: Any) -> Any:
    """Batch and kv heads sharded like the activations, stacked ([L, B, K, S, H]) or per layer."""
    return jax.tree.map(lambda c: sharder.constrain(c, CACHE_NAMES[-c.ndim :]), cache)


class Attention(nn.Module):
    """Without a cache: the training forward. With one (`mode` set) it also returns the cache with this
    layer's keys/values written: "prefill" attends exactly as training does (over the new tokens) and
    writes slots [0, T); "decode" writes slots [cache_index, cache_index + T) and attends over the cache."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, x_BTE: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array, cache=None, cache_index=None):
        cfg = self.cfg
        e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size

        def proj(name: str, heads: int, heads_axis: str) -> jax.Array:
            shape, axes = (e, heads, h), ("embed", heads_axis, "head_dim")
            return Linear(cfg, shape, axes, "bte,enh->btnh", use_bias=cfg.qkv_bias, name=name)(x_BTE)

        q = checkpoint_name(proj("q_proj", n, "heads"), "query_proj")
        kk = checkpoint_name(proj("k_proj", k, "kv_heads"), "key_proj")
        v = checkpoint_name(proj("v_proj", k, "kv_heads"), "value_proj")
        inv_freq = inv_frequencies(h, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions_BT, inv_freq)
        kk = apply_rope(kk, positions_BT, inv_freq)
        q = self.sharder.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        kk = self.sharder.constrain(kk, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = self.sharder.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))

        if cache is not None:
            layer = cache["layer"]
            index = jnp.zeros((), jnp.int32) if self.mode == "prefill" else cache_index
            k_cache = constrain_cache(self.sharder, write_cache(cache["k"], kk, layer, index))
            v_cache = constrain_cache(self.sharder, write_cache(cache["v"], v, layer, index))
            cache = {"k": k_cache, "v": v_cache, "layer": layer}
        if self.mode == "decode":
            ctx = cached_attention(q, k_cache[layer], v_cache[layer], mask_BTS, h**-0.5)
        else:
            ctx = attention(
                q, kk, v, mask_BTS, impl=cfg.attention_impl, aligned=True, sliding_window=cfg.sliding_window
            )
        ctx = checkpoint_name(ctx, "attn_context")
        o_proj = Linear(
            cfg, (n, h, e), ("heads", "head_dim", "embed"), "btnh,nhe->bte", n_in=2, use_bias=cfg.o_bias, name="o_proj"
        )
        out = checkpoint_name(o_proj(ctx), "attn_out")
        return out if cache is None else (out, cache)


class Mlp(nn.Module):
    """SwiGLU. Training and prefill run gate and up as one einsum over the two kernels stacked
    [E, 2, F] (one matmul and one weight-gradient transpose instead of two: the MLP's fwd+bwd is ~20%
    faster on CPU; the stacked axis is unsharded and F keeps its sharding, so nothing moves between
    devices). Decoding keeps two einsums: stacking would copy both kernels on every step of a
    memory-bound loop. Checkpoints keep HF's separate gate_proj / up_proj leaves either way."""

    cfg: ModelConfig
    sharder: Sharder
    fuse_gate_up: bool = True

    @nn.compact
    def __call__(self, x_BTE: jax.Array) -> jax.Array:
        cfg = self.cfg
        e, f = cfg.hidden_size, cfg.intermediate_size
        dtype = cfg.jnp_dtype
        mlp_names = ("activation_batch", "activation_length", "activation_mlp")
        weights = [
            LinearWeights(cfg, (e, f), ("embed", "mlp"), cfg.mlp_bias, name=name)() for name in ("gate_proj", "up_proj")
        ]
        if self.fuse_gate_up:
            w_E2F = jnp.stack([w for w, _ in weights], axis=1).astype(dtype)
            h_BT2F = jnp.einsum("bte,ecf->btcf", x_BTE, w_E2F)
            if cfg.mlp_bias:
                h_BT2F = h_BT2F + _bcast(jnp.stack([b for _, b in weights]).astype(dtype), 4)
            gate, up = h_BT2F[:, :, 0], h_BT2F[:, :, 1]
        else:
            gate, up = (jnp.einsum("bte,ef->btf", x_BTE, w.astype(dtype)) for w, _ in weights)
            if cfg.mlp_bias:
                gate, up = (y + _bcast(b.astype(dtype), 3) for y, (_, b) in zip((gate, up), weights, strict=True))
        hidden = self.sharder.constrain(nn.silu(gate) * up, mlp_names)
        down = Linear(cfg, (f, e), ("mlp", "embed"), "btf,fe->bte", use_bias=cfg.mlp_bias, name="down_proj")
        return checkpoint_name(down(hidden), "mlp_out")


class Block(nn.Module):
    """One decoder layer, with the (carry, broadcast inputs) -> (carry, None) signature of nn.scan.

    The carry is the residual stream; with a cache (`mode` set) it is (stream, cache), and the cache's
    "layer" counter advances by one per Block."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, carry, positions_BT, mask_BTS, cache_index=None):
        x_BTE, cache = (carry, None) if self.mode is None else carry
        h = RMSNorm(self.cfg, name="input_norm")(x_BTE)
        attn = Attention(self.cfg, self.sharder, self.mode, name="attn")
        if cache is None:
            x_BTE = x_BTE + attn(h, positions_BT, mask_BTS)
        else:
            out, cache = attn(h, positions_BT, mask_BTS, cache, cache_index)
            x_BTE, cache = x_BTE + out, {**cache, "layer": cache["layer"] + 1}
        h = RMSNorm(self.cfg, name="post_attn_norm")(x_BTE)
        x_BTE = x_BTE + Mlp(self.cfg, self.sharder, fuse_gate_up=self.mode != "decode", name="mlp")(h)
        x_BTE = self.sharder.constrain(x_BTE, BTE)
        return (x_BTE if cache is None else (x_BTE, cache)), None

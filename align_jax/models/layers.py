"""The decoder's building blocks below one decoder layer.

Leaf modules declare their own params with logical axis names (RMSNorm, Linear, LinearWeights,
Embedding, LmHead); Attention and Mlp compose them. One layer (`Block`) is in block.py, the layer stack
that scans Blocks in layer_stack.py and the model around it in transformer.py.

Projections named in `cfg.lora_targets` carry a LoRA adapter when `cfg.lora_rank` > 0 (`lora_params`,
`lora_delta`), and a frozen kernel may be stored quantised (align_jax/models/nf4.py): the same modules run
full fine-tuning, LoRA and QLoRA.

With a KV cache (`mode` "prefill" or "decode"), Attention also carries the cache: see transformer.py's
module docstring for how it rides in the layer scan.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from align_jax.models.attention import attention, cached_attention, write_cache
from align_jax.models.config import ModelConfig
from align_jax.models.rope import apply_rope, inv_frequencies
from align_jax.models.sequence_parallel import sequence_axes, ulysses_attention
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
    """Llama's RMSNorm (normalise in float32, cast, then scale), or with `cfg.norm_plus_one` Gemma's
    (scale by 1 + w in float32, then cast; the weights are stored around 0)."""

    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), init)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        dtype = cfg.jnp_dtype
        if cfg.norm_plus_one:
            return (y * _bcast(1.0 + scale.astype(jnp.float32), x.ndim)).astype(dtype)
        return _bcast(scale.astype(dtype), x.ndim) * y.astype(dtype)


def dense_kernel(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A kernel in the compute dtype. A QLoRA base kernel arrives here already dequantised, one layer at a
    time: it is stored as an `align_jax.models.nf4.NF4` box, which the param read unboxes."""
    return w.astype(dtype)


def _lora_init(fan_in: int):
    # PEFT's default for A (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    limit = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def lora_params(
    module: nn.Module, shape: tuple[int, ...], axes: tuple[str, ...], n_in: int
) -> tuple[jax.Array, jax.Array] | None:
    """The adapter (lora_a [in..., r], lora_b [r, out...]) of a projection named in cfg.lora_targets.
    B starts at zero, so an adapted model equals its base until the first update."""
    cfg: ModelConfig = module.cfg
    if not cfg.lora_rank or module.name not in cfg.lora_targets:
        return None
    r, fan_in = cfg.lora_rank, math.prod(shape[:n_in])
    a = _param(module, "lora_a", (*shape[:n_in], r), (*axes[:n_in], None), _lora_init(fan_in))
    b = _param(module, "lora_b", (r, *shape[n_in:]), (None, *axes[n_in:]), nn.initializers.zeros)
    return a, b


def lora_delta(module: nn.Module, x: jax.Array, adapter: tuple[jax.Array, jax.Array], n_in: int) -> jax.Array:
    """(alpha / r) * dropout(x) A B: x's last n_in axes contract with A's leading ones. Never merged into
    the kernel, so the frozen base (possibly quantised) is read as it is and no [in, out] delta exists."""
    cfg: ModelConfig = module.cfg
    a, b = adapter
    dtype = cfg.jnp_dtype
    if cfg.lora_dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    xa = jnp.tensordot(x, a.astype(dtype), axes=n_in)
    return jnp.tensordot(xa, b.astype(dtype), axes=1) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dtype)


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
        y = jnp.einsum(self.equation, x, dense_kernel(w, dtype))
        if self.use_bias:
            b = _param(self, "bias", self.shape[self.n_in :], self.axes[self.n_in :], nn.initializers.zeros)
            y = y + _bcast(b.astype(dtype), y.ndim)
        adapter = lora_params(self, self.shape, self.axes, self.n_in)
        if adapter is not None:
            y = y + lora_delta(self, x, adapter, self.n_in)
        return y


class Weights(NamedTuple):
    kernel: Any
    bias: jax.Array | None
    lora: tuple[jax.Array, jax.Array] | None


class LinearWeights(nn.Module):
    """A `Linear`'s kernel, bias (None without one) and LoRA adapter (None without one), declared but not
    applied (the MLP applies gate and up as one einsum)."""

    cfg: ModelConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self) -> Weights:
        w = _param(self, "kernel", self.shape, self.axes, _normal(self.cfg))
        b = _param(self, "bias", self.shape[1:], self.axes[1:], nn.initializers.zeros) if self.use_bias else None
        return Weights(w, b, lora_params(self, self.shape, self.axes, 1))


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


def rope_frequencies(cfg: ModelConfig, is_local: Any) -> jax.Array:
    """Inverse RoPE frequencies of a layer: Gemma 3's sliding layers rotate with their own base and no
    scaling; `is_local` is the layer's flag (traced inside the layer scan, a bool in the layer list)."""
    full = inv_frequencies(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
    if not cfg.mixed_layers or cfg.rope_local_theta is None:
        return jnp.asarray(full)
    local = inv_frequencies(cfg.head_size, cfg.rope_local_theta, None)
    return jnp.where(is_local, jnp.asarray(local), jnp.asarray(full))


def layer_mask(cfg: ModelConfig, side: dict[str, Any], is_local: Any) -> jax.Array:
    """The layer's [B, T, S] mask: with mixed layers (Gemma) the sliding-window or the full one."""
    if not cfg.mixed_layers:
        return side["mask"]
    if isinstance(is_local, bool):
        return side["local_mask"] if is_local else side["mask"]
    return jnp.where(is_local, side["local_mask"], side["mask"])


class Attention(nn.Module):
    """Without a cache: the training forward. With one (`mode` set) it also returns the cache with this
    layer's keys/values written: "prefill" attends exactly as training does (over the new tokens) and
    writes slots [0, T); "decode" writes slots [cache_index, cache_index + T) and attends over the cache.

    `side` holds what every layer shares: positions [B, T], the mask [B, T, S] (and the sliding-window
    one, `local_mask`, when layers differ); `is_local` says which this layer uses."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, x_BTE: jax.Array, side: dict[str, Any], is_local: Any = False, cache=None, cache_index=None):
        cfg = self.cfg
        e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        positions_BT = side["positions"]

        def proj(name: str, heads: int, heads_axis: str) -> jax.Array:
            shape, axes = (e, heads, h), ("embed", heads_axis, "head_dim")
            return Linear(cfg, shape, axes, "bte,enh->btnh", use_bias=cfg.qkv_bias, name=name)(x_BTE)

        q = checkpoint_name(proj("q_proj", n, "heads"), "query_proj")
        kk = checkpoint_name(proj("k_proj", k, "kv_heads"), "key_proj")
        v = checkpoint_name(proj("v_proj", k, "kv_heads"), "value_proj")
        if cfg.qk_norm:  # Qwen3, Gemma 3: per-head RMSNorm of queries and keys, before RoPE
            q = RMSNorm(cfg, "head_dim", name="q_norm")(q)
            kk = RMSNorm(cfg, "head_dim", name="k_norm")(kk)
        inv_freq = rope_frequencies(cfg, is_local)
        q = apply_rope(q, positions_BT, inv_freq)
        kk = apply_rope(kk, positions_BT, inv_freq)
        q = self.sharder.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        kk = self.sharder.constrain(kk, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = self.sharder.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        scale = (cfg.query_pre_attn_scalar or h) ** -0.5

        if cache is not None:
            layer = cache["layer"]
            index = jnp.zeros((), jnp.int32) if self.mode == "prefill" else cache_index
            k_cache = constrain_cache(self.sharder, write_cache(cache["k"], kk, layer, index))
            v_cache = constrain_cache(self.sharder, write_cache(cache["v"], v, layer, index))
            cache = {"k": k_cache, "v": v_cache, "layer": layer}
        if self.mode is None and sequence_axes(self.sharder, q.shape):
            # The length is split over the mesh: Ulysses (sequence_parallel.py), with masks built there from
            # the segment ids (the Decoder then builds no dense [B, T, T] mask).
            ctx = ulysses_attention(
                q,
                kk,
                v,
                side["segment_ids"],
                is_local,
                sharder=self.sharder,
                impl=cfg.attention_impl,
                sliding_window=cfg.uniform_window,
                local_window=cfg.sliding_window if cfg.mixed_layers else None,
                scale=scale,
                softcap=cfg.attn_softcap,
            )
        elif self.mode == "decode":
            mask_BTS = layer_mask(cfg, side, is_local)
            ctx = cached_attention(q, k_cache[layer], v_cache[layer], mask_BTS, scale, cfg.attn_softcap)
        else:
            mask_BTS = layer_mask(cfg, side, is_local)
            ctx = attention(
                q,
                kk,
                v,
                mask_BTS,
                impl=cfg.attention_impl,
                aligned=True,
                sliding_window=cfg.uniform_window,
                scale=scale,
                softcap=cfg.attn_softcap,
                segment_ids=side.get("segment_ids"),
                # Layers that differ in kind (Gemma) all get the full-attention window here: not exact.
                exact_window=not cfg.mixed_layers,
                sharder=self.sharder,
            )
        ctx = checkpoint_name(ctx, "attn_context")
        o_proj = Linear(
            cfg, (n, h, e), ("heads", "head_dim", "embed"), "btnh,nhe->bte", n_in=2, use_bias=cfg.o_bias, name="o_proj"
        )
        out = checkpoint_name(o_proj(ctx), "attn_out")
        return out if cache is None else (out, cache)


def activation(cfg: ModelConfig, gate: jax.Array) -> jax.Array:
    return nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)


class Mlp(nn.Module):
    """SwiGLU (or Gemma's GeGLU). Training and prefill run gate and up as one einsum over the two kernels
    stacked [E, 2, F] (one matmul and one weight-gradient transpose instead of two: the MLP's fwd+bwd is
    ~20% faster on CPU; the stacked axis is unsharded and F keeps its sharding, so nothing moves between
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
            w_E2F = jnp.stack([dense_kernel(w.kernel, dtype) for w in weights], axis=1)
            h_BT2F = jnp.einsum("bte,ecf->btcf", x_BTE, w_E2F)
            if cfg.mlp_bias:
                h_BT2F = h_BT2F + _bcast(jnp.stack([w.bias for w in weights]).astype(dtype), 4)
            gate, up = h_BT2F[:, :, 0], h_BT2F[:, :, 1]
        else:
            gate, up = (jnp.einsum("bte,ef->btf", x_BTE, dense_kernel(w.kernel, dtype)) for w in weights)
            if cfg.mlp_bias:
                gate, up = (y + _bcast(w.bias.astype(dtype), 3) for y, w in zip((gate, up), weights, strict=True))
        if weights[0].lora is not None:
            gate = gate + lora_delta(self, x_BTE, weights[0].lora, 1)
        if weights[1].lora is not None:
            up = up + lora_delta(self, x_BTE, weights[1].lora, 1)
        hidden = self.sharder.constrain(activation(cfg, gate) * up, mlp_names)
        down = Linear(cfg, (f, e), ("mlp", "embed"), "btf,fe->bte", use_bias=cfg.mlp_bias, name="down_proj")
        return checkpoint_name(down(hidden), "mlp_out")

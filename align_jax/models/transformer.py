"""The decoder: Llama / Qwen2 / Mistral in one Flax Linen module.

Parameter layout (every leaf carries logical axis names; `layers` leaves are stacked [L, ...]):

    embed/embedding                 [V, E]      (vocab, embed)
    layers/{input_norm,post_attn_norm}/scale     [L, E]
    layers/attn/{q,k,v}_proj/kernel [L, E, N|K, H]   (+ bias [L, N|K, H] for Qwen2)
    layers/attn/o_proj/kernel       [L, N, H, E]
    layers/mlp/{gate,up}_proj/kernel [L, E, F];  layers/mlp/down_proj/kernel [L, F, E]
    final_norm/scale                [E]
    lm_head/kernel                  [E, V]      (absent with tied embeddings)

The layer stack is an `nn.scan` over units of k = `layers_per_unit` layers (itself an inner scan),
and the unit is what gets rematerialised: only the residual stream entering each unit is kept for the
backward pass (the report's multi-layer checkpointing; see `Unit`). `nn.map_variables` presents the [L/k, k, ...]
unit layout as the canonical [L, ...] one, so checkpoints do not depend on k.

Generation (align_jax/generate.py) runs the same modules with a KV cache: `mode` "prefill" or "decode"
on Attention/Block/Unit/LayerStack. The cache ({"k", "v"}, each [L, B, K, S, H]) then rides in the layer
scan's carry next to the residual stream, with a layer counter saying which slice each Block owns, so a
decode step updates one slot per layer in place instead of re-stacking the whole cache per step.
`LayerList` runs the same Blocks unrolled, on per-layer weights and a per-layer cache (faster decoding).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from align_jax.models.attention import attention, cached_attention, make_mask, write_cache
from align_jax.models.config import ModelConfig
from align_jax.models.rope import apply_rope, inv_frequencies
from align_jax.sharding import Sharder

BTE = ("activation_batch", "activation_length", "activation_embed")


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


CACHE_NAMES = (None, "activation_batch", "activation_kv_heads", None, None)  # [L, B, K, S, H]


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


def _scan(module_cls, length: int, unroll: int = 1, n_broadcast: int = 2):
    return nn.scan(
        module_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * n_broadcast,
        length=length,
        unroll=min(unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Unit(nn.Module):
    """k consecutive layers: the unit of rematerialisation.

    Only the residual stream entering each unit is kept through the forward pass. When the backward
    pass recomputes a unit, each of its k layers is checkpointed again with the same policy, so the
    peak holds (L/k + k) residual streams and one layer's intermediates, instead of L streams (k=1)
    or k layers' intermediates (a flat k-layer unit). The price of k > 1 is one more forward pass."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, carry, positions_BT, mask_BTS, *cache_index):
        cfg = self.cfg
        layer = Block
        if cfg.remat_policy != "none" and cfg.layers_per_unit > 1 and self.mode is None:
            layer = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        scan = _scan(layer, cfg.layers_per_unit, cfg.scan_unroll, 2 + len(cache_index))
        carry, _ = scan(cfg, self.sharder, self.mode, name="unit")(carry, positions_BT, mask_BTS, *cache_index)
        return carry, None


def remat_policy(name: str) -> Any:
    """The jax.checkpoint policy for a config name. Names refer to `checkpoint_name` tags above."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "save_dots": cp.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
        "save_qkv_attn": cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attn_context"),
        "save_out_proj": cp.save_only_these_names("attn_out", "mlp_out"),
    }[name]


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _layers_to_units(cfg: ModelConfig):
    """[L, ...] -> {'unit': [L/k, k, ...]} (and back), boxes included, for nn.map_variables."""
    k, n_units = cfg.layers_per_unit, cfg.num_layers // cfg.layers_per_unit

    def split(x):
        if _is_box(x):
            return x.replace_boxed(split(x.value)).replace(names=("layers", *x.names))
        return x.reshape((n_units, k, *x.shape[1:]))

    def merge(x):
        if _is_box(x):
            return x.replace_boxed(merge(x.value)).replace(names=tuple(x.names[1:]))
        return x.reshape((n_units * k, *x.shape[2:]))

    # The trees come keyed by collection: {"params": {...}}.
    def trans_in(variables):
        return {c: {"unit": jax.tree.map(split, t, is_leaf=_is_box)} if t else t for c, t in variables.items()}

    def trans_out(variables):
        return {c: jax.tree.map(merge, t["unit"], is_leaf=_is_box) if t else t for c, t in variables.items()}

    return trans_in, trans_out


class LayerStack(nn.Module):
    """x -> x; with a cache (`mode` set), (x, cache) -> (x, cache)."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str | None = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache=None, cache_index=None):
        cfg = self.cfg
        unit = Unit
        if cfg.remat_policy != "none" and self.mode is None:  # nothing to rematerialise without a backward pass
            unit = nn.remat(Unit, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        n_units = cfg.num_layers // cfg.layers_per_unit
        extra = () if cache is None else (cache_index,)
        stack = _scan(unit, n_units, max(1, cfg.scan_unroll // cfg.layers_per_unit), 2 + len(extra))
        trans_in, trans_out = _layers_to_units(cfg)
        stack = nn.map_variables(stack, "params", trans_in_fn=trans_in, trans_out_fn=trans_out, init=True, mutable=True)
        carry = x_BTE if cache is None else (x_BTE, {**cache, "layer": jnp.zeros((), jnp.int32)})
        carry, _ = stack(cfg, self.sharder, self.mode, name="stack")(carry, positions_BT, mask_BTS, *extra)
        if cache is None:
            return carry
        x_BTE, cache = carry
        return x_BTE, {"k": cache["k"], "v": cache["v"]}


class LayerList(nn.Module):
    """The layers as L separate Blocks with params {"layer_0": ..., ...} (see `unstack_layers`), with a
    cache only (stacked or per layer). Generation decodes through this: inside the loop over tokens, XLA
    copies every layer's weights (and cache) out of stacked [L, ...] arrays on every step (it does not
    hoist those slices out of the loop), while separate per-layer arrays are read in place. Same Blocks,
    same numbers."""

    cfg: ModelConfig
    sharder: Sharder
    mode: str

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache, cache_index):
        carry = (x_BTE, {"k": cache["k"], "v": cache["v"], "layer": 0})
        for i in range(self.cfg.num_layers):
            block = Block(self.cfg, self.sharder, self.mode, name=f"layer_{i}")
            carry, _ = block(carry, positions_BT, mask_BTS, cache_index)
        x_BTE, cache = carry
        return x_BTE, {"k": cache["k"], "v": cache["v"]}


def unstack_layers(params: Any) -> Any:
    """The params tree for `Decoder(unstacked=True)`: layers/stack's [L, ...] leaves as L per-layer trees."""
    stacked = params["layers"]["stack"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return {**params, "layers": layers}


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


class Decoder(nn.Module):
    """tokens [B,T] -> float32 logits [B,T,V] (or the final-normed hidden states [B,T,E]).

    With a KV `cache` (see attention.init_cache) it returns (logits [B, 1, V] of the last position,
    updated cache). `cache_index=None` is prefill: the T tokens are computed exactly as in training and
    written to slots [0, T). Otherwise it is a decode step: slot `cache_index + t` holds token t, and the
    queries attend over every slot their `kv_segment_ids_BS` [B, S] allows (slot order is causal order).
    `unstacked=True` (with a cache only) runs the layers as a `LayerList` on `unstack_layers(params)`."""

    cfg: ModelConfig
    sharder: Sharder = Sharder()
    unstacked: bool = False

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        positions_BT,
        segment_ids_BT,
        *,
        return_hidden: bool = False,
        cache=None,
        cache_index=None,
        kv_segment_ids_BS=None,
    ):
        cfg, dtype = self.cfg, self.cfg.jnp_dtype
        embedding = Embedding(cfg, name="embed")()
        x = jnp.take(embedding, tokens_BT, axis=0).astype(dtype)
        # A zero a caller can differentiate against (tests read d logits / d inputs through it);
        # without a 'perturbations' collection in apply() it is the identity.
        x = self.perturb("embedded", x)
        x = self.sharder.constrain(x, BTE)

        index_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :], tokens_BT.shape)
        if cache is None or cache_index is None:
            mask_BTS = make_mask(segment_ids_BT, segment_ids_BT, index_BT, index_BT, cfg.sliding_window)
        else:
            kv_index_BS = jnp.broadcast_to(
                jnp.arange(kv_segment_ids_BS.shape[1], dtype=jnp.int32)[None, :], kv_segment_ids_BS.shape
            )
            mask_BTS = make_mask(
                segment_ids_BT, kv_segment_ids_BS, index_BT + cache_index, kv_index_BS, cfg.sliding_window
            )
        if cache is None:
            x = LayerStack(cfg, self.sharder, name="layers")(x, positions_BT, mask_BTS)
        else:
            mode = "prefill" if cache_index is None else "decode"
            index = jnp.zeros((), jnp.int32) if cache_index is None else cache_index
            layers = (LayerList if self.unstacked else LayerStack)(cfg, self.sharder, mode, name="layers")
            x, cache = layers(x, positions_BT, mask_BTS, cache, index)
            x = x[:, -1:]  # sampling needs the last position only
        x = RMSNorm(cfg, name="final_norm")(x)
        if return_hidden:
            return x if cache is None else (x, cache)
        w_EV = embedding.T if cfg.tie_word_embeddings else LmHead(cfg, name="lm_head")()
        logits = jnp.einsum("bte,ev->btv", x, w_EV.astype(dtype), preferred_element_type=jnp.float32)
        logits = self.sharder.constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits if cache is None else (logits, cache)


def default_positions(tokens_BT: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :], tokens_BT.shape)


def boxed_init(cfg: ModelConfig, rng: jax.Array, sharder: Sharder = Sharder(), batch_shape=(1, 8)) -> Any:
    """Params as logical boxes (call under jax.eval_shape for the abstract tree)."""
    tokens = jnp.zeros(batch_shape, jnp.int32)
    return Decoder(cfg, sharder).init(rng, tokens, default_positions(tokens), jnp.ones_like(tokens))["params"]


def init_params(cfg: ModelConfig, rng: jax.Array, sharder: Sharder = Sharder()) -> Any:
    """Fresh params, created directly in their shardings when `sharder` has a mesh."""
    from align_jax.sharding import sharded_init

    init = functools.partial(boxed_init, cfg, sharder=sharder)
    if sharder.mesh is None:
        return jax.jit(lambda r: nn.meta.unbox(init(r)))(rng)
    return sharded_init(init, sharder, rng)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "sharder", "return_hidden"))
def _forward(cfg, params, tokens_BT, positions_BT, segment_ids_BT, sharder, return_hidden):
    return Decoder(cfg, sharder).apply(
        {"params": params}, tokens_BT, positions_BT, segment_ids_BT, return_hidden=return_hidden
    )


def forward(
    cfg: ModelConfig,
    params: Any,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    sharder: Sharder = Sharder(),
    return_hidden: bool = False,
) -> jax.Array:
    """float32 logits [B, T, V]. Positions default to 0..T-1, segment ids to one segment per row."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    positions = default_positions(tokens) if positions is None else jnp.asarray(positions, jnp.int32)
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr.shape != tokens.shape:
            raise ValueError(f"{name} has shape {arr.shape}, tokens {tokens.shape}: they must match")
    return _forward(cfg, params, tokens, positions, segment_ids, sharder, return_hidden)

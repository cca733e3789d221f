"""The decoder: Llama / Qwen2 / Mistral in one Flax Linen module.

Parameter layout (every leaf carries logical axis names; `layers` leaves are stacked [L, ...]):

    embed/embedding                 [V, E]      (vocab, embed)
    layers/{input_norm,post_attn_norm}/scale     [L, E]
    layers/attn/{q,k,v}_proj/kernel [L, E, N|K, H]   (+ bias [L, N|K, H] for Qwen2)
    layers/attn/o_proj/kernel       [L, N, H, E]
    layers/mlp/{gate,up}_proj/kernel [L, E, F];  layers/mlp/down_proj/kernel [L, F, E]
    final_norm/scale                [E]
    lm_head/kernel                  [E, V]      (absent with tied embeddings)

Where the pieces live: layers.py holds the blocks up to one decoder layer (norms, projections,
Attention, Mlp, Block); layer_stack.py the L layers as a scanned, rematerialised `LayerStack` (whose
unit layout [L/k, k, ...] is presented as the canonical [L, ...] one, so checkpoints do not depend on
k) or an unrolled `LayerList`; this module the `Decoder` around them, its init and `forward`.

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

from align_jax.models.attention import make_mask, soft_cap
from align_jax.models.block import Block as Block
from align_jax.models.config import ModelConfig

# The building blocks and the layer stack live in their own modules; the names stay importable from here
# (the model's public surface), so callers and checkpoints see one module.
from align_jax.models.layer_stack import LayerList as LayerList
from align_jax.models.layer_stack import LayerStack as LayerStack
from align_jax.models.layer_stack import Unit as Unit
from align_jax.models.layer_stack import remat_policy as remat_policy
from align_jax.models.layer_stack import unstack_layers as unstack_layers
from align_jax.models.layers import BTE as BTE
from align_jax.models.layers import CACHE_NAMES as CACHE_NAMES
from align_jax.models.layers import Attention as Attention
from align_jax.models.layers import Embedding as Embedding
from align_jax.models.layers import Linear as Linear
from align_jax.models.layers import LinearWeights as LinearWeights
from align_jax.models.layers import LmHead as LmHead
from align_jax.models.layers import Mlp as Mlp
from align_jax.models.layers import RMSNorm as RMSNorm
from align_jax.models.layers import constrain_cache as constrain_cache
from align_jax.models.sequence_parallel import sequence_axes
from align_jax.sharding import Sharder


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
        # Sequence parallelism: the length split over the mesh, training only (sequence_parallel.py).
        sequence_parallel = cache is None and bool(sequence_axes(self.sharder, tokens_BT.shape))
        embedding = Embedding(cfg, name="embed")()
        table = embedding
        if sequence_parallel:
            # The table's embed dim is split over (fsdp, sequence) and the looked-up rows over (batch,
            # sequence): XLA cannot move between the two but by replicating all [B, T, E] rows on every
            # device. Gathering the table's embed dim first (in the compute dtype) lets each device look up
            # its own tokens; the cast commutes with the lookup, so the numbers are the same.
            table = self.sharder.constrain(embedding.astype(dtype), ("vocab", None))
        x = jnp.take(table, tokens_BT, axis=0).astype(dtype)
        if cfg.embed_scale:  # Gemma; the factor is rounded to the compute dtype first, as in transformers
            x = x * jnp.asarray(cfg.hidden_size**0.5, dtype)
        # A zero a caller can differentiate against (tests read d logits / d inputs through it);
        # without a 'perturbations' collection in apply() it is the identity.
        x = self.perturb("embedded", x)
        x = self.sharder.constrain(x, BTE)

        index_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :], tokens_BT.shape)
        if cache is None or cache_index is None:
            kv_seg_BS, q_index_BT, kv_index_BS = segment_ids_BT, index_BT, index_BT
        else:
            kv_seg_BS, q_index_BT = kv_segment_ids_BS, index_BT + cache_index
            kv_index_BS = jnp.broadcast_to(jnp.arange(kv_seg_BS.shape[1], dtype=jnp.int32)[None, :], kv_seg_BS.shape)
        # What every layer shares. Gemma's layers alternate between two masks, so both are built once.
        side = {
            "positions": positions_BT,
            # Segment-id kernels (splash, flash, sequence parallelism) build their own masks from these;
            # the dense masks below are then unused and XLA drops them.
            "segment_ids": segment_ids_BT,
            # Under sequence parallelism each layer builds its mask inside its shard_map from the segment ids:
            # no dense [B, T, T] mask over a long context.
            "mask": None
            if sequence_parallel
            else make_mask(segment_ids_BT, kv_seg_BS, q_index_BT, kv_index_BS, cfg.uniform_window),
            "local_mask": None,
            "token_mask": segment_ids_BT > 0 if cfg.num_experts else None,
        }
        if cfg.mixed_layers and not sequence_parallel:
            side["local_mask"] = make_mask(segment_ids_BT, kv_seg_BS, q_index_BT, kv_index_BS, cfg.sliding_window)
        if cache is None:
            x = LayerStack(cfg, self.sharder, name="layers")(x, side)
        else:
            mode = "prefill" if cache_index is None else "decode"
            index = jnp.zeros((), jnp.int32) if cache_index is None else cache_index
            layers = (LayerList if self.unstacked else LayerStack)(cfg, self.sharder, mode, name="layers")
            x, cache = layers(x, side, cache, index)
            x = x[:, -1:]  # sampling needs the last position only
        x = RMSNorm(cfg, name="final_norm")(x)
        if return_hidden:
            return x if cache is None else (x, cache)
        w_EV = embedding.T if cfg.tie_word_embeddings else LmHead(cfg, name="lm_head")()
        logits = jnp.einsum("bte,ev->btv", x, w_EV.astype(dtype), preferred_element_type=jnp.float32)
        logits = soft_cap(logits, cfg.final_softcap)
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

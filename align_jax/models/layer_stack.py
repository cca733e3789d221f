"""The L decoder layers as one module: a scanned, rematerialised stack (`LayerStack`) or, for decoding,
an unrolled list (`LayerList`).

The stack is an `nn.scan` over units of k = `layers_per_unit` layers (itself an inner scan), and the
unit is what gets rematerialised: only the residual stream entering each unit is kept for the backward
pass (the report's multi-layer checkpointing; see `Unit`). `nn.map_variables` presents the
[L/k, k, ...] unit layout as the canonical [L, ...] one, so checkpoints do not depend on k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from align_jax.models.block import Block
from align_jax.models.config import ModelConfig
from align_jax.sharding import Sharder


def _scan(module_cls, length: int, unroll: int = 1, with_cache_index: bool = False):
    """Scans (carry, side, is_local[, cache_index]): `side` is broadcast, the per-layer flag scanned.
    Sown "intermediates" (a MoE layer's aux loss) stack along the scan like the params."""
    return nn.scan(
        module_cls,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0) + ((nn.broadcast,) if with_cache_index else ()),
        length=length,
        unroll=min(unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def local_layers(cfg: ModelConfig) -> list[bool]:
    """Per layer: whether it is a sliding-window layer of a model whose layers differ (Gemma)."""
    if not cfg.mixed_layers:
        return [False] * cfg.num_layers
    return [t == "sliding_attention" for t in cfg.layer_types]


def remat_policy(name: str) -> Any:
    """The jax.checkpoint policy for a config name. Names refer to the `checkpoint_name` tags in
    layers.py."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "save_dots": cp.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
        "save_qkv_attn": cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attn_context"),
        "save_out_proj": cp.save_only_these_names("attn_out", "mlp_out"),
    }[name]


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
    def __call__(self, carry, side, is_local_K, *cache_index):
        cfg = self.cfg
        layer = Block
        if cfg.remat_policy != "none" and cfg.layers_per_unit > 1 and self.mode is None:
            layer = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        scan = _scan(layer, cfg.layers_per_unit, cfg.scan_unroll, bool(cache_index))
        carry, _ = scan(cfg, self.sharder, self.mode, name="unit")(carry, side, is_local_K, *cache_index)
        return carry, None


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
    def __call__(self, x_BTE, side, cache=None, cache_index=None):
        cfg = self.cfg
        unit = Unit
        if cfg.remat_policy != "none" and self.mode is None:  # nothing to rematerialise without a backward pass
            unit = nn.remat(Unit, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
        n_units = cfg.num_layers // cfg.layers_per_unit
        extra = () if cache is None else (cache_index,)
        stack = _scan(unit, n_units, max(1, cfg.scan_unroll // cfg.layers_per_unit), bool(extra))
        trans_in, trans_out = _layers_to_units(cfg)
        # init only while initialising: flax's init path runs the stack on the unmapped params whenever any
        # collection is mutable, which an apply that collects "intermediates" (MoE losses) also makes true.
        stack = nn.map_variables(
            stack, "params", trans_in_fn=trans_in, trans_out_fn=trans_out, init=self.is_initializing(), mutable=True
        )
        carry = x_BTE if cache is None else (x_BTE, {**cache, "layer": jnp.zeros((), jnp.int32)})
        flags = jnp.asarray(local_layers(cfg)).reshape(n_units, cfg.layers_per_unit)
        carry, _ = stack(cfg, self.sharder, self.mode, name="stack")(carry, side, flags, *extra)
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
    def __call__(self, x_BTE, side, cache, cache_index):
        carry = (x_BTE, {"k": cache["k"], "v": cache["v"], "layer": 0})
        for i, is_local in enumerate(local_layers(self.cfg)):
            block = Block(self.cfg, self.sharder, self.mode, name=f"layer_{i}")
            carry, _ = block(carry, side, is_local, cache_index)
        x_BTE, cache = carry
        return x_BTE, {"k": cache["k"], "v": cache["v"]}


def unstack_layers(params: Any) -> Any:
    """The params tree for `Decoder(unstacked=True)`: layers/stack's [L, ...] leaves as L per-layer trees."""
    stacked = params["layers"]["stack"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return {**params, "layers": layers}

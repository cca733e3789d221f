"""Where each of our param leaves lives in a Hugging Face checkpoint, per family.

A leaf maps to one HF tensor, or to one per layer (stacked leaves, [L, ...]), or to one per layer and
expert ([L, X, ...]: routed experts). Layouts: None is the same array; 0 means HF holds it flattened to
1-D (norm scales, biases [N, H] -> [N*H]); k > 0 means our kernel [in (k dims)..., out...] is HF's
weight [out, in] transposed and flattened.

Experts are written as the released checkpoints carry them (one tensor per expert: Qwen3-MoE's
`mlp.experts.{j}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{j}.w1.weight`) and read in that
form or in transformers 5's fused one (`mlp.experts.gate_up_proj` [X, 2F, E], `mlp.experts.down_proj`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from align_jax.models.config import GEMMA_TYPES, ModelConfig

# (our path below `layers/stack`) -> (HF name below `model.layers.{i}`, layout).
_LAYER_MAP = {
    ("input_norm", "scale"): ("input_layernorm.weight", 0),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", 1),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", 1),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", 1),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", 2),
    ("attn", "q_proj", "bias"): ("self_attn.q_proj.bias", 0),
    ("attn", "k_proj", "bias"): ("self_attn.k_proj.bias", 0),
    ("attn", "v_proj", "bias"): ("self_attn.v_proj.bias", 0),
    ("attn", "o_proj", "bias"): ("self_attn.o_proj.bias", 0),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", 0),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", 0),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", 1),
    ("mlp", "gate_proj", "bias"): ("mlp.gate_proj.bias", 0),
    ("mlp", "up_proj", "bias"): ("mlp.up_proj.bias", 0),
    ("mlp", "down_proj", "bias"): ("mlp.down_proj.bias", 0),
}
# Gemma norms both sides of each sublayer; its `post_attention_layernorm` is the attention output's norm,
# and the MLP's input norm is `pre_feedforward_layernorm`.
_GEMMA_NORMS = {
    ("attn_out_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("post_attn_norm", "scale"): ("pre_feedforward_layernorm.weight", 0),
    ("mlp_out_norm", "scale"): ("post_feedforward_layernorm.weight", 0),
}
# Expert leaves: (our name below mlp/experts) -> (Qwen3-MoE name, Mixtral name, part of the fused tensors).
_EXPERTS = {
    "gate_proj": ("gate_proj", "w1", "gate"),
    "up_proj": ("up_proj", "w3", "up"),
    "down_proj": ("down_proj", "w2", "down"),
}
_TOP_MAP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", None),
    ("final_norm", "scale"): ("model.norm.weight", 0),
    ("lm_head", "kernel"): ("lm_head.weight", 1),
}

# A tensor in a checkpoint: a name, or (name, expert, first row, end row) of a fused expert tensor.
TensorRef = str | tuple[str, int, int, int]


@dataclasses.dataclass(frozen=True)
class LeafNames:
    """The HF tensors of one leaf, one per slice over its leading `stack` dims (row-major), and the
    alternative (fused) refs when the checkpoint may hold experts either way."""

    names: tuple[TensorRef, ...]
    stack: int  # 0: top-level leaf; 1: [L, ...]; 2: [L, X, ...]
    n_in: int | None
    fused: tuple[TensorRef, ...] | None = None


def _moe_prefix(cfg: ModelConfig) -> str:
    return "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"


def leaf_names(cfg: ModelConfig, path: tuple[str, ...]) -> LeafNames:
    if path[:2] != ("layers", "stack"):
        name, n_in = _TOP_MAP[path]
        return LeafNames((name,), 0, n_in)
    sub, layers = path[2:], range(cfg.num_layers)
    if sub == ("mlp", "router", "kernel"):
        names = tuple(f"model.layers.{i}.{_moe_prefix(cfg)}.gate.weight" for i in layers)
        fused = tuple(f"model.layers.{i}.mlp.gate.weight" for i in layers)
        return LeafNames(names, 1, 1, fused)
    if sub[:2] == ("mlp", "experts"):
        qwen, mixtral, part = _EXPERTS[sub[2]]
        own = mixtral if cfg.model_type == "mixtral" else qwen
        x, f = range(cfg.num_experts), cfg.expert_size
        names = tuple(f"model.layers.{i}.{_moe_prefix(cfg)}.experts.{j}.{own}.weight" for i in layers for j in x)
        rows = {"gate": (0, f), "up": (f, 2 * f), "down": (0, cfg.hidden_size)}[part]
        tensor = "down_proj" if part == "down" else "gate_up_proj"
        fused = tuple((f"model.layers.{i}.mlp.experts.{tensor}", j, *rows) for i in layers for j in x)
        return LeafNames(names, 2, 1, fused)
    table = {**_LAYER_MAP, **_GEMMA_NORMS} if cfg.model_type in GEMMA_TYPES else _LAYER_MAP
    name, n_in = table[sub]
    return LeafNames(tuple(f"model.layers.{i}.{name}" for i in layers), 1, n_in)


def ref_name(ref: TensorRef) -> str:
    return ref if isinstance(ref, str) else ref[0]


def hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return shape
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(hf: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
    return hf.T.reshape(shape) if n_in else hf.reshape(shape)


def to_hf(ours: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return ours
    if n_in == 0:
        return ours.reshape(-1)
    return ours.reshape(math.prod(ours.shape[:n_in]), -1).T

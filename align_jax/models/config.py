"""`ModelConfig`: the one description of a decoder, and its mapping to and from HF `config.json`.

The architecture fields mirror Hugging Face's so a checkpoint round-trips without loss. The runtime
fields (dtypes, attention implementation, remat) are ours: they never reach `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

# model_type -> the HF architecture class name written into config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_qkv_attn", "save_out_proj")
ATTENTION_IMPLS = ("auto", "reference", "cudnn", "splash")
# ModelConfig fields that are ours, not the checkpoint's: they never reach config.json.
RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "remat_policy", "layers_per_unit", "scan_unroll")


class ConfigError(ValueError):
    """A model configuration (ours or a `config.json`) that align_jax cannot use."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama / Qwen2 / Mistral-family decoder. Frozen and hashable: it is a static jit argument."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
    # ("linear", factor), or None. A tuple, not a dict, so the config stays hashable.
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only.
    o_bias: bool = False  # Llama `attention_bias=True` puts a bias on o_proj too.
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: a key is visible if q_idx - k_idx < sliding_window.
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    # Runtime settings (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype; fp32 params + bf16 compute is the training default
    attention_impl: str = "auto"
    remat_policy: str = "none"
    layers_per_unit: int = 1  # multi-layer checkpointing: one remat unit covers k layers
    # Unrolling of the layer scan (1 = a rolled loop). Unrolled, XLA skips stacking each layer's saved
    # activations into [L, ...] buffers: faster for small models on CPU; big models keep 1 for compile time.
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"ModelConfig: {msg}")

        if self.model_type not in ARCHITECTURES:
            bad(f"model_type={self.model_type!r} is not supported; use one of {sorted(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.rope_scaling is not None and self.rope_scaling[0] not in ROPE_TYPES[1:]:
            bad(f"rope_scaling type {self.rope_scaling[0]!r} is not supported; use one of {ROPE_TYPES}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.remat_policy not in REMAT_POLICIES:
            bad(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.layers_per_unit <= 0 or self.num_layers % self.layers_per_unit:
            bad(f"layers_per_unit={self.layers_per_unit} must divide num_layers={self.num_layers}")
        if self.scan_unroll < 1:
            bad(f"scan_unroll must be >= 1, got {self.scan_unroll}")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                bad(f"{name}={getattr(self, name)!r} is not a dtype")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (used for MFU accounting)."""
        e, f, h = self.hidden_size, self.intermediate_size, self.head_size
        n, k = self.num_heads, self.num_kv_heads
        attn = e * (n + 2 * k) * h + n * h * e
        attn += (n + 2 * k) * h if self.qkv_bias else 0
        attn += e if self.o_bias else 0
        mlp = 3 * e * f + ((2 * f + e) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * e
        total = self.num_layers * per_layer + e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        emb = self.vocab_size * e
        return total + head + (emb if include_embedding else 0)


# ---------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig


def _rope_from_hf(d: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    """Reads both the transformers<5 form (`rope_theta` + `rope_scaling`) and the >=5 form
    (`rope_parameters` holding `rope_theta` and `rope_type`)."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params if scaling is None else scaling
    theta = 10000.0 if theta is None else float(theta)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, ("linear", float(scaling["factor"]))
    if kind == "llama3":
        try:
            return theta, (
                "llama3",
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{where}: llama3 rope scaling is missing field {e}") from None
    raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (supported: {ROPE_TYPES})")


def from_hf_dict(d: dict[str, Any], where: str = "config.json", **runtime: Any) -> ModelConfig:
    """Builds a ModelConfig from the contents of an HF `config.json`; `runtime` sets our own fields."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        archs = d.get("architectures")
        raise ConfigError(
            f"{where}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"align_jax supports {sorted(ARCHITECTURES)}"
        )
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    try:
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        theta, scaling = _rope_from_hf(d, where)
        sliding = None
        if model_type == "mistral":
            sliding = d.get("sliding_window")
        elif model_type == "qwen2" and d.get("use_sliding_window"):
            # Qwen2's sliding window applies to some layers only (`max_window_layers`); released
            # Qwen2/2.5 checkpoints all ship with it off. A per-layer window is not built yet.
            raise ConfigError(f"{where}: Qwen2 use_sliding_window=true is not supported")
        attention_bias = bool(d.get("attention_bias", False))
        head_dim = d.get("head_dim")
        cfg = ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=None if head_dim is None or int(head_dim) * heads == hidden else int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=None if sliding is None else int(sliding),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **runtime,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e} is missing") from None
    return cfg


def to_hf_dict(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` for `cfg`. Rope is written in the legacy form (`rope_theta` + `rope_scaling`),
    which transformers 4.x reads natively and 5.x converts on load."""
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.rope_scaling is not None:
        kind = cfg.rope_scaling[0]
        if kind == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling[1]}
        else:
            _, factor, low, high, orig = cfg.rope_scaling
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
    if cfg.model_type == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise ConfigError("llama checkpoints have one attention_bias for q/k/v/o; qkv_bias != o_bias")
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif cfg.model_type == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise ConfigError("qwen2 checkpoints have q/k/v bias only")
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    elif cfg.model_type == "mistral":
        if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise ConfigError("mistral checkpoints have no biases")
        d["sliding_window"] = cfg.sliding_window
    if torch_dtype is not None:
        d["torch_dtype"] = torch_dtype
    return d


def read_hf_config(hf_dir: str | os.PathLike, **runtime: Any) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_dict(d, where=path, **runtime)

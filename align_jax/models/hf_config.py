"""HF `config.json` <-> `ModelConfig`, for every family align_jax runs.

Reading accepts both the transformers<5 keys (`rope_theta` + `rope_scaling`, Gemma 3's
`rope_local_base_freq`, `num_experts`) and the >=5 ones (`rope_parameters`, keyed by layer type for
Gemma 3; `num_local_experts`). Writing uses the keys the released checkpoints of each family carry.
"""

from __future__ import annotations

import json
import os
from typing import Any

from align_jax.models.config import ARCHITECTURES, ROPE_TYPES, ConfigError, ModelConfig

_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


def _scaling_from(scaling: dict[str, Any] | None, where: str) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return ("linear", float(scaling["factor"]))
    if kind == "llama3":
        try:
            return (
                "llama3",
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{where}: llama3 rope scaling is missing field {e}") from None
    raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (supported: {ROPE_TYPES})")


def _rope_from_hf(d: dict[str, Any], where: str) -> tuple[float, tuple | None, float | None]:
    """(theta, scaling) of the full-attention layers, and the local theta of Gemma 3's sliding layers."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    local = d.get("rope_local_base_freq")
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3, transformers>=5)
        sliding = params.get("sliding_attention") or {}
        if _scaling_from(sliding, where) is not None:
            raise ConfigError(f"{where}: rope scaling on sliding-window layers is not supported")
        local = sliding.get("rope_theta", local)
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params if scaling is None else scaling
    theta = 10000.0 if theta is None else float(theta)
    return theta, _scaling_from(scaling, where), None if local is None else float(local)


def _layer_types(d: dict[str, Any], model_type: str, n: int) -> tuple[str, ...] | None:
    types = d.get("layer_types")
    if types is None and model_type == "gemma2":  # before transformers 5: every other layer, from layer 0
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if types is None and model_type == "gemma3_text":
        period = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    return None if types is None else tuple(types)


def _family_fields(d: dict[str, Any], model_type: str, n_layers: int, where: str) -> dict[str, Any]:
    """What each family adds to the Llama core."""
    bias = bool(d.get("attention_bias", False))
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and d.get("use_sliding_window"):
        # Qwen's window covers some layers only (`max_window_layers`); released checkpoints ship it off.
        raise ConfigError(f"{where}: {model_type} use_sliding_window=true is not supported")
    out: dict[str, Any] = {"qkv_bias": bias, "o_bias": bias if model_type == "llama" else False}
    if model_type == "qwen2":
        out["qkv_bias"] = True
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        out["qk_norm"] = True
        out["o_bias"] = False
    if model_type in ("mistral", "mixtral") and d.get("sliding_window") is not None:
        out["sliding_window"] = int(d["sliding_window"])
    if model_type in ("qwen3_moe", "mixtral"):
        if model_type == "qwen3_moe":
            step, only = int(d.get("decoder_sparse_step", 1) or 1), list(d.get("mlp_only_layers") or [])
            if step != 1 or only:
                raise ConfigError(
                    f"{where}: dense layers between expert layers (decoder_sparse_step={step}, "
                    f"mlp_only_layers={only}) are not supported; released Qwen3-MoE checkpoints use 1 and []"
                )
        experts = d.get("num_local_experts", d.get("num_experts"))
        if experts is None:
            raise ConfigError(f"{where}: required field 'num_experts' (or 'num_local_experts') is missing")
        out.update(
            num_experts=int(experts),
            num_experts_per_tok=int(d["num_experts_per_tok"]),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
            norm_topk_prob=True if model_type == "mixtral" else bool(d.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        )
    if model_type in ("gemma2", "gemma3_text"):
        types = _layer_types(d, model_type, n_layers)
        out.update(
            norm_plus_one=True,
            sandwich_norms=True,
            embed_scale=True,
            attn_softcap=d.get("attn_logit_softcapping"),
            final_softcap=d.get("final_logit_softcapping"),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or d.get("head_dim") or 256),
            layer_types=types,
            sliding_window=int(d["sliding_window"]) if types and "sliding_attention" in types else None,
        )
        for key in ("attn_softcap", "final_softcap"):
            out[key] = None if out[key] is None else float(out[key])
    return out


def from_hf_dict(d: dict[str, Any], where: str = "config.json", **runtime: Any) -> ModelConfig:
    """Builds a ModelConfig from the contents of an HF `config.json`; `runtime` sets our own fields."""
    model_type = d.get("model_type")
    if model_type == "gemma3" and isinstance(d.get("text_config"), dict):
        raise ConfigError(
            f"{where}: a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); align_jax trains the "
            "text model: load the checkpoint's language model as Gemma3ForCausalLM (model_type gemma3_text)"
        )
    if model_type not in ARCHITECTURES:
        archs = d.get("architectures")
        raise ConfigError(
            f"{where}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"align_jax supports {sorted(ARCHITECTURES)}"
        )
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act not in _ACTS:
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (silu or gelu_pytorch_tanh)")
    try:
        hidden, heads, n_layers = int(d["hidden_size"]), int(d["num_attention_heads"]), int(d["num_hidden_layers"])
        theta, scaling, local_theta = _rope_from_hf(d, where)
        head_dim = d.get("head_dim")
        family = _family_fields(d, model_type, n_layers, where)
        cfg = ModelConfig(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=None if head_dim is None or int(head_dim) * heads == hidden else int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=local_theta if model_type == "gemma3_text" else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in ("gemma2", "gemma3_text"))),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            hidden_act=_ACTS[act],
            **family,
            **runtime,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e} is missing") from None
    return cfg


def _rope_dict(scaling: tuple) -> dict[str, Any]:
    if scaling[0] == "linear":
        return {"rope_type": "linear", "factor": scaling[1]}
    _, factor, low, high, orig = scaling
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x


def _check_family(cfg: ModelConfig) -> None:
    """Our config must be one the family's checkpoint format can say."""
    t = cfg.model_type
    if t == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise ConfigError("llama checkpoints have one attention_bias for q/k/v/o; qkv_bias != o_bias")
    if t == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise ConfigError("qwen2 checkpoints have q/k/v bias only")
    if t in ("mistral", "mixtral", "gemma2", "gemma3_text") and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise ConfigError(f"{t} checkpoints have no biases")
    if t in ("qwen3", "qwen3_moe", "gemma3_text") and not cfg.qk_norm:
        raise ConfigError(f"{t} checkpoints have q/k norms; qk_norm=False cannot be written as one")
    if t in ("qwen3", "qwen3_moe") and (cfg.o_bias or cfg.mlp_bias or cfg.sliding_window):
        raise ConfigError(f"{t} checkpoints have no o/mlp bias and no sliding window here")


def to_hf_dict(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` for `cfg`. Rope is written in the legacy form (`rope_theta` + `rope_scaling`),
    which transformers 4.x reads natively and 5.x converts on load."""
    _check_family(cfg)
    t = cfg.model_type
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[t]],
        "model_type": t,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
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
    act = "silu" if cfg.hidden_act == "silu" else "gelu_pytorch_tanh"
    d["hidden_activation" if t in ("gemma2", "gemma3_text") else "hidden_act"] = act
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = _rope_dict(cfg.rope_scaling)
    if t == "llama":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif t in ("qwen2", "qwen3", "qwen3_moe"):
        d.update(use_sliding_window=False, sliding_window=None)
        if t != "qwen2":
            d["attention_bias"] = cfg.qkv_bias
    elif t in ("mistral", "mixtral"):
        d["sliding_window"] = cfg.sliding_window
    if cfg.num_experts:
        d.update(
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
        if t == "mixtral":
            d.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_size, router_jitter_noise=0.0)
        else:
            d.update(
                num_experts=cfg.num_experts,
                moe_intermediate_size=cfg.expert_size,
                norm_topk_prob=cfg.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
    if t in ("gemma2", "gemma3_text"):
        d.update(
            attention_bias=False,
            attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=cfg.final_softcap,
            # transformers types it as an int (released checkpoints use 256 or 168)
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types) if cfg.layer_types else None,
        )
        if t == "gemma3_text":
            d["rope_local_base_freq"] = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
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

"""The architectures of the real-model presets, as their Hugging Face `config.json` says them.

Those presets take the model's shape from `init_from` (an HF directory or an earlier stage's workdir),
which a machine that only plans does not have. The planner reads `--hf_config` or the config's
`init_from` when given, else the entry here of the preset's name. Only the fields that shape the
params and the step are kept (token ids, dtypes and the like do not change memory).
"""

from __future__ import annotations

from typing import Any

_LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B (3.1-8B differs only in RoPE scaling and context length).
    "llama3_8b": _LLAMA3_8B,
    "llama3_8b_qlora": _LLAMA3_8B,
    # meta-llama/Llama-3.1-8B: Llama-3-8B's shapes, RoPE scaled to 128k positions (configs/sft.py:long32k).
    "long32k": {
        **_LLAMA3_8B,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # meta-llama/Meta-Llama-3-70B.
    "llama3_70b": {
        **_LLAMA3_8B,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
    # Qwen/Qwen2-7B (Qwen2.5-7B has the same shapes); biases on q/k/v.
    "qwen2_7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
    # Qwen/Qwen3-8B: q/k norms, head_dim 128.
    "qwen3_8b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    # Qwen/Qwen3-30B-A3B: 128 experts, 8 per token.
    "qwen3_30b_a3b": {
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    # google/gemma-3-12b's text model (Gemma3ForCausalLM): 5 sliding-window layers to 1 global.
    "gemma3_12b": {
        "model_type": "gemma3_text",
        "vocab_size": 262208,
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
}


def hf_config(preset: str) -> dict[str, Any] | None:
    """The config.json fields of `preset`'s model, or None when the preset is not in the table."""
    return HF_CONFIGS.get(preset)

"""Tiny random Hugging Face models, one per family and feature, built locally (no hub)."""

from __future__ import annotations

import os

import torch
import transformers

# Each exercises what its family adds: GQA everywhere; llama3 RoPE scaling; tied embeddings and
# q/k/v bias (Qwen2); a sliding window shorter than the test sequence (Mistral).
TINY = {
    "llama": dict(
        cls=transformers.LlamaConfig,
        kw=dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "llama_bias": dict(
        cls=transformers.LlamaConfig, kw=dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    ),
    "qwen2": dict(cls=transformers.Qwen2Config, kw=dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": dict(cls=transformers.MistralConfig, kw=dict(sliding_window=5, head_dim=12)),
    # q/k norms and a head_dim that is not hidden / heads.
    "qwen3": dict(cls=transformers.Qwen3Config, kw=dict(head_dim=16, rope_theta=1000000.0)),
    # Small soft caps so they bend the numbers; query scaling != head_dim; local/global layers with a
    # window shorter than the test sequence; GeGLU; (1 + w) and sandwich norms; scaled embeddings.
    "gemma2": dict(
        cls=transformers.Gemma2Config,
        kw=dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=0.03,
            final_logit_softcapping=3.0,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    # Routed experts: 4 experts, 2 per token; Qwen3-MoE without renormalising the top-k probabilities.
    "qwen3_moe": dict(
        cls=transformers.Qwen3MoeConfig,
        kw=dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
    ),
    "mixtral": dict(
        cls=transformers.MixtralConfig, kw=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=40)
    ),
    # Gemma 3 adds q/k norms and a RoPE base (and scaling) per layer type.
    "gemma3": dict(
        cls=transformers.Gemma3TextConfig,
        kw=dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        ),
    ),
}
COMMON = dict(
    vocab_size=211,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def build(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    spec = TINY[family]
    config = spec["cls"](**{**COMMON, **spec["kw"], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at 1 and biases at 0 (and Qwen3-MoE's router at 0, its experts uninitialised);
    # perturb / fill them so the test sees their mapping.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif ".experts." in name or name.endswith("mlp.gate.weight"):
                p.copy_(0.02 * torch.randn_like(p) * (10.0 if name.endswith("gate.weight") else 1.0))
    return model.float().eval()


def save(model: transformers.PreTrainedModel, path: str | os.PathLike, **kw) -> str:
    model.save_pretrained(path, **kw)
    return str(path)


def torch_logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
        )
    return out.logits.float().numpy()

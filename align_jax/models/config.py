"""`ModelConfig`: the one description of a decoder, and its mapping to and from HF `config.json`.

The architecture fields mirror Hugging Face's so a checkpoint round-trips without loss. The runtime
fields (dtypes, attention implementation, remat) are ours: they never reach `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# model_type -> the HF architecture class name written into config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
MOE_TYPES = ("qwen3_moe", "mixtral")
GEMMA_TYPES = ("gemma2", "gemma3_text")
HIDDEN_ACTS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
MOE_IMPLS = ("auto", "ragged", "dense")
# The projections LoRA may adapt, by their module names (HF's names too, so PEFT's target_modules match).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_qkv_attn", "save_out_proj")
ATTENTION_IMPLS = ("auto", "reference", "cudnn", "splash", "flash")
# ModelConfig fields that are ours, not the checkpoint's: they never reach config.json.
RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "remat_policy", "layers_per_unit", "scan_unroll")
# Runtime fields set from other config sections (`config.lora`, `config.model.moe_impl` when present).
EXTRA_RUNTIME_FIELDS = ("moe_impl", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


class ConfigError(ValueError):
    """A model configuration (ours or a `config.json`) that align_jax cannot use."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama / Qwen2 / Mistral / Qwen3 / Qwen3-MoE / Mixtral / Gemma 2 / Gemma 3 decoder. Frozen and
    hashable: it is a static jit argument. The family differences are fields, so one set of modules
    covers them all: q/k norms (Qwen3, Gemma 3), routed experts (Qwen3-MoE, Mixtral), and Gemma's
    embedding scale, (1 + w) norms, norms on both sides of each sublayer, soft-capping, query scaling,
    GELU and alternating local / global layers."""

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
    # Qwen3 / Gemma 3: an RMSNorm over head_dim on queries and keys, before RoPE.
    qk_norm: bool = False
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    # Gemma: RMSNorm computed in float32 and scaled by (1 + w) (weights stored around 0).
    norm_plus_one: bool = False
    # Gemma 2/3: a norm on each sublayer's output too, before it joins the residual stream.
    sandwich_norms: bool = False
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    query_pre_attn_scalar: float | None = None  # Gemma: scores scale by this ** -0.5, not head_dim ** -0.5
    # Per-layer attention kind ("sliding_attention" sees `sliding_window` keys back, "full_attention" all);
    # None: every layer slides when sliding_window is set (Mistral), else every layer is full.
    layer_types: tuple[str, ...] | None = None
    # Gemma 3: sliding layers rotate with this base (and no scaling); full layers use rope_theta/rope_scaling.
    rope_local_theta: float | None = None
    # Mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is num_experts SwiGLU experts of
    # moe_intermediate_size, num_experts_per_tok of them per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in the training loss

    # Runtime settings (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype; fp32 params + bf16 compute is the training default
    attention_impl: str = "auto"
    remat_policy: str = "none"
    layers_per_unit: int = 1  # multi-layer checkpointing: one remat unit covers k layers
    # Unrolling of the layer scan (1 = a rolled loop). Unrolled, XLA skips stacking each layer's saved
    # activations into [L, ...] buffers: faster for small models on CPU; big models keep 1 for compile time.
    scan_unroll: int = 1
    moe_impl: str = "auto"  # ragged: sorted tokens through grouped matmuls; dense: every expert on every token
    # LoRA (config.lora): rank 0 is off. The adapted projections gain lora_a [in..., r] and lora_b [r, out...].
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

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
        if self.attention_impl in ("splash", "flash") and self.mixed_layers:
            # These kernels take one static window per call; the layers share one (full-attention) value.
            bad(f"attention_impl={self.attention_impl!r} needs every layer to attend alike; layer_types mixes kinds")
        if self.hidden_act not in HIDDEN_ACTS:
            bad(f"hidden_act={self.hidden_act!r} is not one of {HIDDEN_ACTS}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                bad(f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
            if set(self.layer_types) - set(LAYER_TYPES):
                bad(f"layer_types may hold only {LAYER_TYPES}, got {sorted(set(self.layer_types))}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                bad("layer_types has sliding_attention layers but sliding_window is None")
        if self.num_experts:
            if self.model_type not in MOE_TYPES:
                bad(f"num_experts is set but model_type={self.model_type!r} has no experts ({MOE_TYPES} do)")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
        elif self.model_type in MOE_TYPES:
            bad(f"model_type={self.model_type!r} needs num_experts > 0")
        if self.moe_impl not in MOE_IMPLS:
            bad(f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}")
        if self.lora_rank < 0:
            bad(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and not self.lora_targets:
            bad("lora_rank > 0 needs at least one of lora_targets")
        if set(self.lora_targets) - set(LORA_TARGETS):
            bad(f"lora_targets may hold only {LORA_TARGETS}, got {sorted(set(self.lora_targets) - set(LORA_TARGETS))}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
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

    @property
    def mixed_layers(self) -> bool:
        """Whether layers differ in attention kind (Gemma): each layer then picks its mask and RoPE."""
        return self.layer_types is not None and len(set(self.layer_types)) > 1

    @property
    def uniform_window(self) -> int | None:
        """The window of the shared mask: None (full attention) when some layer is full, since layers
        that differ pick the sliding one from `local_mask`."""
        if self.layer_types is not None and "full_attention" in self.layer_types:
            return None
        return self.sliding_window

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count from the shapes alone. `active`: with experts, count only the
        num_experts_per_tok experts a token runs through (what MFU accounting needs)."""
        e, f, h = self.hidden_size, self.intermediate_size, self.head_size
        n, k = self.num_heads, self.num_kv_heads
        attn = e * (n + 2 * k) * h + n * h * e
        attn += (n + 2 * k) * h if self.qkv_bias else 0
        attn += e if self.o_bias else 0
        attn += 2 * h if self.qk_norm else 0
        if self.num_experts:
            experts = self.num_experts_per_tok if active else self.num_experts
            mlp = experts * 3 * e * self.expert_size + e * self.num_experts
        else:
            mlp = 3 * e * f + ((2 * f + e) if self.mlp_bias else 0)
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * e
        total = self.num_layers * per_layer + e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        emb = self.vocab_size * e
        return total + head + (emb if include_embedding else 0)

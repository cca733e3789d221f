"""The config sections every training stage shares, each with its defaults and its checks.

A stage config (align_jax/config/__init__.py: `base_config(stage)`) is the run's own fields (stage,
init_from, tokenizer, seed), these sections (model, data, mesh, optim, train, metrics, lora), and the stage's
own settings at its top level (align_jax/config/stage_sections.py). Sections are ml_collections
ConfigDicts: a value of the wrong type fails on assignment, and an unknown key fails on the command line.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from align_jax.errors import UserError
from align_jax.models.config import ATTENTION_IMPLS, LORA_TARGETS, REMAT_POLICIES
from align_jax.sharding import MESH_AXES, normalize_rules

DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
# The rm and dpo stages' row formats (align_jax/data/preference.py; a test keeps the two in step).
PREFERENCE_FORMATS = ("auto", "hh_rlhf", "preference", "kto")
PAIR_STAGES = ("rm", "dpo")
# data.loss_on of the SFT-style stages (align_jax/data/tokenize.py, which documents them; a test keeps the two
# in step): "auto" trains the whole chat where the template renders it as growing prefixes, else each
# assistant turn as its own sample.
LOSS_ON = ("auto", "assistant", "per_turn", "last_assistant", "all")


class ConfigValueError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


def get(c: ml_collections.ConfigDict, key: str) -> Any:
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def positive(c: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        if not get(c, key) > 0:
            raise ConfigValueError(f"config.{key} must be positive, got {get(c, key)}")


def non_negative(c: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        if get(c, key) < 0:
            raise ConfigValueError(f"config.{key}={get(c, key)} must be >= 0")


def one_of(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigValueError(f"config.{key}={value!r} is not one of {allowed}")


# -- model ------------------------------------------------------------------------------------------


def model_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # Architecture, used only when training from scratch (init_from unset); an HF init reads config.json.
    m.model_type = "llama"
    m.vocab_size = 512
    m.hidden_size = 128
    m.intermediate_size = 352
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 0  # 0: hidden_size // num_heads
    m.rope_theta = 10000.0
    m.max_position_embeddings = 2048
    m.tie_word_embeddings = True
    # Runtime settings (apply to HF inits too).
    m.param_dtype = "float32"
    m.dtype = "bfloat16"
    m.attention_impl = "auto"
    m.remat_policy = "none"
    m.layers_per_unit = 1
    m.scan_unroll = 1  # num_layers = fully unrolled (small models on CPU)
    return m


def validate_model(c: ml_collections.ConfigDict) -> None:
    one_of(c.model.remat_policy, REMAT_POLICIES, "model.remat_policy")
    one_of(c.model.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
    if c.model.num_layers % c.model.layers_per_unit:
        raise ConfigValueError(
            f"config.model.layers_per_unit={c.model.layers_per_unit} must divide num_layers={c.model.num_layers}"
        )


# -- data -------------------------------------------------------------------------------------------


def data_section(stage: str) -> ml_collections.ConfigDict:
    """What the stage reads and how it packs it. SFT-style stages add `loss_on`; the pair stages add
    `max_pairs` and `unpaired`."""
    d = ml_collections.ConfigDict()
    d.train = ""  # path, glob, "demo:NAME" (bundled data) or a datasets name
    d.eval = ""
    d.format = "auto"
    d.seq_len = 256
    d.batch_size = 8  # global, in packed rows
    d.over_long = "truncate"  # truncate | drop
    d.on_bad_row = "error"  # error | skip
    d.shuffle_seed = 0
    d.pack_window = 1000
    d.eval_batches = 0  # 0: the whole eval split
    if stage in ("sft", "pas"):
        d.loss_on = "auto"  # auto | assistant | per_turn | last_assistant | all
    if stage in PAIR_STAGES:
        # Most pairs packed into one row (0: seq_len // 32), and KTO's unpaired view of paired data
        # (each pair -> a desirable and an undesirable example).
        d.max_pairs = 0
        d.unpaired = False
    return d


def validate_data(c: ml_collections.ConfigDict) -> None:
    positive(c, "data.seq_len", "data.batch_size")
    one_of(c.data.format, PREFERENCE_FORMATS if c.stage in PAIR_STAGES else DATA_FORMATS, "data.format")
    if "loss_on" in c.data:
        one_of(c.data.loss_on, LOSS_ON, "data.loss_on")
    one_of(c.data.over_long, ("truncate", "drop"), "data.over_long")
    one_of(c.data.on_bad_row, ("error", "skip"), "data.on_bad_row")
    if "max_pairs" in c.data and c.data.max_pairs < 0:
        raise ConfigValueError(f"config.data.max_pairs={c.data.max_pairs} must be >= 0 (0: seq_len // 32)")
    if not c.data.train and c.stage != "pas":  # the pas stage writes its own training file
        raise ConfigValueError("config.data.train is empty: give a file, glob, 'demo:NAME' or dataset name")


# -- mesh -------------------------------------------------------------------------------------------


def mesh_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict({ax: (-1 if ax == "data" else 1) for ax in MESH_AXES})
    # Overrides of the default logical-axis rules, as (logical_name, mesh_axes) pairs.
    m.rules = ()
    return m


def mesh_shape(c: ml_collections.ConfigDict) -> dict[str, int]:
    return {ax: int(c.mesh[ax]) for ax in MESH_AXES}


def validate_mesh(c: ml_collections.ConfigDict) -> None:
    sizes = list(mesh_shape(c).values())
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigValueError(f"config.mesh={mesh_shape(c)}: sizes are positive, with at most one -1")
    normalize_rules(c.mesh.rules)


# -- optim ------------------------------------------------------------------------------------------


def optim_section() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = 3e-4
    o.schedule = "cosine"
    o.warmup_steps = 10
    o.min_lr_ratio = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.clip_norm = 1.0
    return o


def validate_optim(c: ml_collections.ConfigDict) -> None:
    positive(c, "optim.lr")
    one_of(c.optim.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    non_negative(c, "optim.warmup_steps")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigValueError(f"config.optim.min_lr_ratio={c.optim.min_lr_ratio} must be in [0, 1]")


# -- train ------------------------------------------------------------------------------------------


def train_section() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 100
    t.microbatches = 1
    t.z_loss = 0.0
    # Positions per chunk of the LM head + loss (0: all at once). Large vocabularies want ~1024:
    # only one chunk's [B, chunk, V] logits then exist.
    t.loss_chunk = 0
    t.log_every = 10
    t.eval_every = 0
    t.ckpt_every = 0
    t.keep = 3  # latest checkpoints kept (the final one always is); 0: keep every checkpoint
    t.best_metric = ""  # e.g. "eval_loss": also keep the best checkpoint by it
    t.async_checkpoint = True
    t.progress = True
    t.peak_flops = 0.0  # per device, for MFU; 0 -> from the device kind
    return t


def validate_train(c: ml_collections.ConfigDict) -> None:
    positive(c, "train.steps", "train.microbatches", "train.log_every")
    non_negative(c, "train.keep", "train.eval_every", "train.ckpt_every")
    if c.train.loss_chunk < 0:
        raise ConfigValueError(f"config.train.loss_chunk={c.train.loss_chunk} must be >= 0 (0: no chunking)")
    if c.data.batch_size % c.train.microbatches:
        raise ConfigValueError(
            f"config.data.batch_size={c.data.batch_size} is not divisible by config.train.microbatches={c.train.microbatches}"
        )


# -- metrics ----------------------------------------------------------------------------------------


def metrics_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.tensorboard = True
    m.wandb_project = ""
    return m


# -- lora -------------------------------------------------------------------------------------------

LORA_QUANTIZE = ("none", "nf4")


def lora_section() -> ml_collections.ConfigDict:
    """LoRA / QLoRA (align_jax/lora): train low-rank adapters on a frozen base instead of every weight."""
    s = ml_collections.ConfigDict()
    s.rank = 0  # 0: off (full fine-tuning)
    s.alpha = 16.0  # the adapter's output is scaled by alpha / rank
    s.dropout = 0.0  # on the adapters' input, in train steps only
    # The adapted projections: a comma-separated string ("q_proj,v_proj"), a tuple, or "all".
    s.targets = ml_collections.FieldReference(",".join(LORA_TARGETS), field_type=object)
    s.quantize = "none"  # none | nf4: the frozen base's projection kernels in 4-bit NormalFloat (QLoRA)
    s.block_size = 64  # NF4 values per absmax scale
    return s


def lora_targets(value: Any) -> tuple[str, ...]:
    """config.lora.targets as a tuple of projection names: a comma-separated string, a tuple or list (whose
    items may hold commas too: absl passes `--config.lora.targets=q_proj,v_proj` as one string), or "all"."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, tuple | list) else None
    if items is None or not all(isinstance(x, str) for x in items):
        raise ConfigValueError(f"config.lora.targets={value!r}: a comma-separated string or a tuple of names")
    names = [n.strip().strip("'\"()[] ") for x in items for n in x.split(",")]
    names = [n for n in names if n]
    if names == ["all"]:
        return LORA_TARGETS
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigValueError(
            f"config.lora.targets={value!r}: each of {', '.join(LORA_TARGETS)} at most once, or 'all' "
            f"(unknown: {unknown})"
        )
    return tuple(n for n in LORA_TARGETS if n in names)  # canonical order: the same run, however spelt


def validate_lora(c: ml_collections.ConfigDict) -> None:
    if "lora" not in c:
        return
    s = c.lora
    if not isinstance(s.rank, int) or s.rank < 0:
        raise ConfigValueError(f"config.lora.rank={s.rank!r} must be an integer >= 0 (0: off)")
    if not s.alpha > 0:
        raise ConfigValueError(f"config.lora.alpha={s.alpha} must be positive")
    if not 0.0 <= s.dropout < 1.0:
        raise ConfigValueError(f"config.lora.dropout={s.dropout} must be in [0, 1)")
    lora_targets(s.targets)
    one_of(s.quantize, LORA_QUANTIZE, "lora.quantize")
    if s.quantize != "none" and not s.rank:
        raise ConfigValueError(
            f"config.lora.quantize={s.quantize!r} quantises the frozen base of a LoRA run (QLoRA): set config.lora.rank > 0"
        )
    if s.block_size < 2 or s.block_size % 2:
        raise ConfigValueError(f"config.lora.block_size={s.block_size} must be even and >= 2 (two NF4 codes per byte)")


def lora_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig runtime fields config.lora sets (none of them reach config.json)."""
    if "lora" not in c or not c.lora.rank:
        return {}
    s = c.lora
    return dict(
        lora_rank=int(s.rank),
        lora_alpha=float(s.alpha),
        lora_dropout=float(s.dropout),
        lora_targets=lora_targets(s.targets),
    )


SECTIONS = {
    "model": (model_section, validate_model),
    "data": (data_section, validate_data),
    "mesh": (mesh_section, validate_mesh),
    "optim": (optim_section, validate_optim),
    "train": (train_section, validate_train),
    "metrics": (metrics_section, None),
    "lora": (lora_section, validate_lora),
}

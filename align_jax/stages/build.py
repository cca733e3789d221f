"""What every stage builds before its first step: mesh, tokenizer, model config, and a sharded
train state (fresh, from `init_from`, or resumed) with its shardings."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from align_jax import checkpoint
from align_jax.config.sections import lora_fields, mesh_shape
from align_jax.errors import NotFoundError
from align_jax.models.config import RUNTIME_FIELDS, ModelConfig
from align_jax.models.hf import abstract_params
from align_jax.models.hf_config import to_hf_dict
from align_jax.models.transformer import boxed_init
from align_jax.sharding import Sharder, batch_sharding, make_mesh, normalize_rules, tree_shardings
from align_jax.stages.spec import Context, ParamsInit
from align_jax.train.optim import make_optimizer
from align_jax.train.state import TrainState
from align_jax.workdir import TOKENIZER_DIR, resolve_data_path

log = logging.getLogger(__name__)


def make_sharder(config: ml_collections.ConfigDict, devices: list | None = None) -> Sharder:
    """The mesh and rules of config.mesh, over `devices` (default: all; the fit planner passes a TPU
    topology's compile-only devices)."""
    mesh = make_mesh(mesh_shape(config), devices)
    rules = dict(normalize_rules(None))
    rules.update(normalize_rules(config.mesh.rules))
    sharder = Sharder(mesh, tuple(rules.items()))
    # Each microbatch is split over the batch axes; say so now rather than fail in batch assembly.
    axes = rules.get("activation_batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    micro = int(config.data.batch_size) // int(config.train.microbatches)
    if micro % ways:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} in {config.train.microbatches} microbatch(es) gives "
            f"{micro} rows each, which the batch axes {axes} ({ways} devices: {dict(mesh.shape)}) cannot split; "
            f"use a multiple of {ways * int(config.train.microbatches)} or a smaller mesh"
        )
    return sharder


def runtime_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: config.model[k] for k in RUNTIME_FIELDS}


def model_config(config: ml_collections.ConfigDict, tokenizer: Any) -> ModelConfig:
    """From init_from's config when there is one; else the architecture in config.model. config.lora sets
    the LoRA fields (runtime: the architecture, and so config.json, stays the base's)."""
    runtime = {**runtime_fields(config), **lora_fields(config)}
    if config.init_from:
        return checkpoint.model_config_of(config.init_from, **runtime)
    m = config.model
    vocab = max(int(m.vocab_size), len(tokenizer))
    return ModelConfig(
        model_type=m.model_type,
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim or None,
        rope_theta=m.rope_theta,
        max_position_embeddings=max(m.max_position_embeddings, config.data.seq_len),
        tie_word_embeddings=m.tie_word_embeddings,
        qkv_bias=m.model_type == "qwen2",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **runtime,
    )


def _train_texts(config: ml_collections.ConfigDict, limit: int = 20000) -> Iterator[str]:
    """Message texts of the first `limit` rows of config.data.train, for training the demo tokenizer.
    Read by the same source readers and row checks as training (any file type or dataset the stage reads;
    blank lines, a BOM or invalid UTF-8 handled as there), so a bad row fails here with its file, row and
    field, or is passed over under on_bad_row=skip (and counted once, when training reads it)."""
    from align_jax.data.formats import BadRowError, to_record
    from align_jax.data.pipeline import BadRows
    from align_jax.data.preference_formats import to_preference_record
    from align_jax.data.sources import open_source

    source = open_source(resolve_data_path(config.data.train), split="train")
    to_canonical = to_preference_record if config.stage in ("rm", "dpo") else to_record
    bad_rows = BadRows(config.data.on_bad_row)
    for raw, origin in source.read(range(min(limit, len(source)))):
        try:
            if isinstance(raw, BadRowError):
                raise raw
            record = to_canonical(raw, config.data.format, origin)
        except BadRowError as e:
            bad_rows.handle(e, None)
            continue
        for value in record.values():  # messages, or prompt / chosen / rejected / completion
            if isinstance(value, list):
                yield from (m["content"] for m in value)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """The run's tokenizer. Saved into WORKDIR/tokenizer on first use, so a resumed run and the export
    use the very same one."""
    from transformers import AutoTokenizer

    saved = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(saved, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(saved)
    if config.tokenizer == "demo":
        from align_jax.data.bpe import train_tokenizer

        tok = train_tokenizer(_train_texts(config), vocab_size=config.model.vocab_size)
    elif config.tokenizer:
        tok = AutoTokenizer.from_pretrained(config.tokenizer)
    elif config.init_from:
        if checkpoint.init_from_kind(config.init_from) == "hf":
            src = config.init_from
        else:
            src = os.path.join(config.init_from, TOKENIZER_DIR)
            if not os.path.isfile(os.path.join(src, "tokenizer_config.json")):
                raise NotFoundError(
                    f"init_from={config.init_from}: the workdir has no {TOKENIZER_DIR}/ to take the tokenizer from; "
                    "set config.tokenizer to a tokenizer directory"
                )
        tok = AutoTokenizer.from_pretrained(src)
    else:
        raise ValueError("config.tokenizer is empty and there is no config.init_from to take one from")
    if jax.process_index() == 0:  # written beside, then renamed: never a half-saved tokenizer
        tmp = saved + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(saved, ignore_errors=True)
        os.replace(tmp, saved)
    return tok


def context(config: ml_collections.ConfigDict, workdir: str) -> Context:
    """What every stage is built on: the workdir, the run's tokenizer, the mesh, the model config."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer = load_tokenizer(config, workdir)
    sharder = make_sharder(config)
    return Context(config, workdir, tokenizer, sharder, model_config(config, tokenizer))


def loader_config(config: ml_collections.ConfigDict, fields_of: type) -> dict:
    """config.data as a data loader's config (the fields of its dataclass: the rest of config.data is the
    loop's), with demo:NAME paths resolved."""
    d = {f.name: config.data[f.name] for f in dataclasses.fields(fields_of)}
    d["train"] = resolve_data_path(d["train"])
    d["eval"] = resolve_data_path(d["eval"]) if d["eval"] else None
    return d


def decoder_params(ctx: Context) -> ParamsInit:
    """A decoder's params: the model config's architecture, fresh or init_from's."""
    cfg, sharder = ctx.model_cfg, ctx.sharder
    return ParamsInit(
        boxed_abstract=abstract_params(cfg, sharder),
        fresh=lambda rng: nn.meta.unbox(boxed_init(cfg, rng, sharder=sharder)),
    )


@dataclasses.dataclass
class StateSetup:
    """A sharded train state and everything needed to rebuild or restore it."""

    model_cfg: ModelConfig
    sharder: Sharder
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    param_shardings: Any
    state_shardings: Any
    abstract_state: Any
    abstract_params: Any
    make_state: Callable[[Any], TrainState]

    def batch_shardings(self, fields: tuple[str, ...]) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.sharder) for k in fields}


def setup_state(
    model_cfg: ModelConfig,
    sharder: Sharder,
    config: ml_collections.ConfigDict,
    init_params_fn: Callable[[jax.Array], Any] | None = None,
    boxed_abstract: Any = None,
) -> StateSetup:
    """Shardings of params and optimizer state, from the abstract init (nothing is allocated here)."""
    optimizer, schedule = make_optimizer(config.optim, int(config.train.steps))
    boxed = boxed_abstract if boxed_abstract is not None else abstract_params(model_cfg, sharder)
    param_shardings = tree_shardings(boxed, sharder)
    abs_params = nn.meta.unbox(boxed)
    seed = int(config.seed)

    def make_state(params):
        return TrainState.create(params, optimizer, seed)

    abstract = jax.eval_shape(make_state, abs_params)
    replicated = NamedSharding(sharder.mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    state_shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated, frozen=None
    )
    abstract_state = checkpoint.abstract_with_shardings(abstract, state_shardings)
    return StateSetup(
        model_cfg=model_cfg,
        sharder=sharder,
        optimizer=optimizer,
        schedule=schedule,
        param_shardings=param_shardings,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        abstract_params=checkpoint.abstract_with_shardings(abs_params, param_shardings),
        make_state=make_state,
    )


def initial_state(
    setup: StateSetup,
    config: ml_collections.ConfigDict,
    checkpointer: checkpoint.Checkpointer | None,
    workdir: str,
    fresh_params: Callable[[jax.Array], Any] | None = None,
    *,
    init_abstract_params: Any = None,
    params_from_init: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, dict, str]:
    """Applies the init precedence (checkpoint.initialize) with this stage's shardings.

    A stage whose params are not the init_from model's (the RM: a decoder plus a new head) passes
    `init_abstract_params` (what to read from init_from) and `params_from_init` (init_from's params ->
    this stage's params, in `setup.param_shardings`)."""
    cfg, sharder = setup.model_cfg, setup.sharder
    fresh_params = fresh_params or (lambda rng: nn.meta.unbox(boxed_init(cfg, rng, sharder=sharder)))
    fresh = jax.jit(lambda rng: setup.make_state(fresh_params(rng)), out_shardings=setup.state_shardings)
    from_params = jax.jit(setup.make_state, in_shardings=(setup.param_shardings,), out_shardings=setup.state_shardings)
    adapt = params_from_init or (lambda p: p)
    return checkpoint.initialize(
        workdir,
        checkpointer,
        abstract_state=setup.abstract_state,
        init_from=config.init_from or None,
        fresh_state=lambda: fresh(jax.random.key(int(config.seed))),
        state_from_params=lambda p: from_params(adapt(p)),
        abstract_params=setup.abstract_params if init_abstract_params is None else init_abstract_params,
        model_cfg=cfg,
        sharder=sharder,
    )


def saved_config(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> dict:
    """What a checkpoint records about its run: the config, and the model in HF terms (for export
    and for the next stage's init_from)."""
    saved = {
        "config": json.loads(config.to_json_best_effort()),
        "hf_model_config": to_hf_dict(model_cfg),
        "runtime": {k: getattr(model_cfg, k) for k in RUNTIME_FIELDS},
    }
    if model_cfg.lora_rank:  # what shapes a LoRA run's state (its checkpoints hold adapters only; lora/handoff.py)
        saved["lora"] = {"rank": model_cfg.lora_rank, "targets": list(model_cfg.lora_targets)}
    return saved


def init_from_params(
    setup: StateSetup, config: ml_collections.ConfigDict, abstract: Any = None, shardings: Any = None
) -> Any:
    """The params the run started from (init_from's, or the seeded fresh init), in the param shardings:
    DPO's frozen reference, reloaded on resume rather than stored in every checkpoint. `abstract` and
    `shardings` name the decoder's part when the stage's params hold more (PPO's policy + value)."""
    cfg, sharder = setup.model_cfg, setup.sharder
    abstract = setup.abstract_params if abstract is None else abstract
    shardings = setup.param_shardings if shardings is None else shardings
    if not config.init_from:
        init = jax.jit(lambda rng: nn.meta.unbox(boxed_init(cfg, rng, sharder=sharder)), out_shardings=shardings)
        return init(jax.random.key(int(config.seed)))
    if checkpoint.is_hf_dir(config.init_from):
        from align_jax.models.hf import load_pretrained

        _, params = load_pretrained(config.init_from, dtype=cfg.param_dtype, compute_dtype=cfg.dtype, sharder=sharder)
        return params
    return checkpoint.restore_params(config.init_from, abstract, sharder=sharder)

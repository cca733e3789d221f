"""A stage's train step from shapes alone, for the fit planner (align_jax/plan/, launch/plan.py).

`runner.Run` builds a stage for training: tokenizer, data, mesh, model config, then the sharded train
state and `make_train_step` around the stage's loss. The planner needs the step only, compiled for a
topology it does not have and a model whose weights it never loads, so it builds what `Run` builds after
the spec (state shardings, frozen reference or LoRA base, router loss, the jitted step) from the stage's
own pieces, put together as the stage's `spec` puts them, minus the data. Nothing is allocated: the state
and batch are `jax.ShapeDtypeStruct`s with shardings. tests/test_plan.py checks that the step lowered
here is, op for op, the one `Run` lowers for the same config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from align_jax import checkpoint
from align_jax.batch import PAIR_BATCH, REFERENCE_LOGPS, SFT_BATCH, BatchSpec
from align_jax.config.sections import lora_fields
from align_jax.lora import model_apply_fn
from align_jax.lora.plan import LoraPlan
from align_jax.losses.dpo import preference_loss
from align_jax.losses.grpo import PolicyObjective, grpo_loss, ppo_loss
from align_jax.losses.reward import reward_loss
from align_jax.losses.router_aux import with_router_aux
from align_jax.losses.sft import sft_loss
from align_jax.metrics import flops_per_token
from align_jax.models.config import ModelConfig
from align_jax.models.heads import ScalarModel
from align_jax.models.hf_config import from_hf_dict
from align_jax.models.transformer import Decoder
from align_jax.plan.architectures import hf_config
from align_jax.sharding import Sharder
from align_jax.stages import build, dpo, grpo, rm
from align_jax.stages.spec import Context, ParamsInit
from align_jax.train.step import LossFn, make_train_step


@dataclasses.dataclass
class StepParts:
    """What a stage's spec gives the step: batch fields, loss, params, FLOP accounting."""

    batch: BatchSpec
    loss_fn: LossFn
    params: ParamsInit
    flops_per_token: Callable[[float], float]


def _sft(ctx: Context) -> StepParts:  # as sft.spec
    c = ctx.config
    loss = functools.partial(
        sft_loss,
        apply_fn=model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder)),
        z_loss=float(c.train.z_loss),
        loss_chunk=int(c.train.loss_chunk),
    )
    return StepParts(SFT_BATCH, loss, build.decoder_params(ctx), functools.partial(flops_per_token, ctx.model_cfg))


def _rm(ctx: Context) -> StepParts:  # as rm.spec
    c = ctx.config
    model = ScalarModel(ctx.model_cfg, ctx.sharder)
    loss = functools.partial(
        reward_loss,
        apply_fn=model_apply_fn(model),
        margin=float(c.margin),
        score_weight=float(c.score_weight),
        center_weight=float(c.center_weight),
    )
    flops = functools.partial(rm.reward_flops_per_token, ctx.model_cfg)
    return StepParts(PAIR_BATCH, loss, rm.scalar_params(model, int(c.seed)), flops)


def _dpo(ctx: Context) -> StepParts:  # as dpo.spec
    c = ctx.config
    mode = dpo.reference_mode(c)
    params = build.decoder_params(ctx)
    params.reference = params.copy_reference = mode == "in_step"
    loss = functools.partial(
        preference_loss,
        apply_fn=model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder)),
        objective=dpo.objective_of(c),
        loss_chunk=int(c.train.loss_chunk),
    )

    def flops(avg_context: float) -> float:
        f = flops_per_token(ctx.model_cfg, avg_context)
        if mode == "in_step":  # + the reference's forward
            f += flops_per_token(ctx.model_cfg, avg_context, backward=False)
        return f

    batch = BatchSpec.of(PAIR_BATCH.fields, REFERENCE_LOGPS) if mode == "precomputed" else PAIR_BATCH
    return StepParts(batch, loss, params, flops)


def _grpo(ctx: Context) -> StepParts:  # as grpo.spec: the update step (the rollout is apart)
    g = ctx.config
    objective = PolicyObjective.from_config(g, loss_chunk=g.train.loss_chunk)
    policy_fn = model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder))
    if g.algorithm == "ppo":
        value_model = ScalarModel(ctx.model_cfg, ctx.sharder)
        params = grpo.ppo_params(ctx, value_model)
        loss = functools.partial(
            ppo_loss, apply_fn=policy_fn, value_fn=model_apply_fn(value_model), objective=objective
        )
    else:
        params = build.decoder_params(ctx)
        params.reference = True
        loss = functools.partial(grpo_loss, apply_fn=policy_fn, objective=objective)
    return StepParts(grpo.batch_spec(g), loss, params, functools.partial(flops_per_token, ctx.model_cfg))


STAGES: dict[str, Callable[[Context], StepParts]] = {"sft": _sft, "pas": _sft, "rm": _rm, "dpo": _dpo, "grpo": _grpo}


def batch_shapes(batch: BatchSpec, config: ml_collections.ConfigDict, model_cfg: ModelConfig, sharder: Sharder) -> dict:
    """The global batch a step takes, as sharded ShapeDtypeStructs (axis letters as in align_jax/batch.py)."""
    d = config.data
    sizes = {"B": int(d.batch_size), "T": int(d.seq_len)}
    if "max_pairs" in d:  # as PreferenceDataConfig.pairs_per_row
        sizes["P"] = int(d.max_pairs) or max(1, int(d.seq_len) // 32)
    if "kl_topk" in config:  # as the rollout's top-k
        sizes["K"] = min(int(config.kl_topk), model_cfg.vocab_size)

    def dim(token: str) -> int:
        if token[0].isdigit():  # "2P"
            return int(token[0]) * sizes[token[1:]]
        name, _, minus = token.partition("-")  # "T-1"
        return sizes[name] - int(minus or 0)

    shardings = batch.shardings(sharder)
    out = {}
    for name, field in batch.fields.items():
        shape = [dim(t) for t in field.shape.split()]
        if name.startswith("ptx_"):  # PTX rows come ptx_batch_size at a time (grpo.ptx_iterator)
            shape[0] = int(config.ptx_batch_size)
        out[name] = jax.ShapeDtypeStruct(tuple(shape), field.dtype, sharding=shardings[name])
    return out


@dataclasses.dataclass
class AbstractStep:
    """A stage's jitted train step and abstract (sharded, unallocated) arguments for it."""

    step_fn: Any
    state: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    parts: StepParts
    model_cfg: ModelConfig
    sharder: Sharder

    def lower(self) -> Any:
        return self.step_fn.lower(self.state, self.batch)


def abstract_step(config: ml_collections.ConfigDict, sharder: Sharder, model_cfg: ModelConfig) -> AbstractStep:
    """The step `runner.Run` would build for `config` on `sharder`'s mesh, with abstract arguments."""
    ctx = Context(config, workdir="", tokenizer=None, sharder=sharder, model_cfg=model_cfg)
    parts = STAGES[config.stage](ctx)
    p = parts.params
    # From here as runner.Run.__init__ (and Run.initial_state for what the state holds).
    lora = LoraPlan(p, model_cfg, sharder, config) if model_cfg.lora_rank else None
    setup = build.setup_state(
        model_cfg, sharder, config, boxed_abstract=p.boxed_abstract if lora is None else lora.boxed_trainable
    )

    def part(tree: Any) -> Any:
        return tree if p.init_from_part is None else tree[p.init_from_part]

    shardings, state = setup.state_shardings, setup.abstract_state
    if lora is not None:
        shardings = shardings.replace(frozen=lora.frozen_shardings)
        state = state.replace(frozen=checkpoint.abstract_with_shardings(lora.frozen_abstract, lora.frozen_shardings))
    elif p.reference:
        shardings = shardings.replace(frozen=part(setup.param_shardings))
        state = state.replace(frozen=part(setup.abstract_params))
    loss_fn = parts.loss_fn
    if model_cfg.num_experts:
        loss_fn = with_router_aux(loss_fn, model_cfg.router_aux_loss_coef)
    if lora is not None:
        loss_fn = lora.loss(loss_fn, train=True)
    step_fn = make_train_step(
        loss_fn,
        setup.optimizer,
        microbatches=int(config.train.microbatches),
        state_shardings=shardings,
        batch_shardings=parts.batch.shardings(sharder),
    )
    batch = batch_shapes(parts.batch, config, model_cfg, sharder)
    return AbstractStep(step_fn, state, batch, parts, model_cfg, sharder)


class _NoTokenizer:
    """Stands in for the run's tokenizer when the model comes from config.model: its vocab_size stands
    (a tokenizer can only grow it, and the demo's is trained to that size) and no token id shapes memory."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __len__(self) -> int:
        return 0


def model_config(config: ml_collections.ConfigDict, preset: str = "") -> tuple[ModelConfig, str]:
    """(the run's ModelConfig, where its architecture came from): init_from's config.json or saved config
    when set (no weights are read), else the preset's entry in align_jax/plan/architectures.py, else
    config.model."""
    if config.init_from:
        return build.model_config(config, _NoTokenizer()), f"init_from={config.init_from}"
    d = hf_config(preset)
    if d is not None:
        runtime = {**build.runtime_fields(config), **lora_fields(config)}
        where = f"align_jax/plan/architectures.py:{preset}"
        return from_hf_dict(d, where=where, **runtime), where  # as an init_from's config.json reads
    return build.model_config(config, _NoTokenizer()), "config.model"


def builder(preset: str = "") -> Callable[[ml_collections.ConfigDict, list], AbstractStep]:
    """(config, devices) -> the abstract step of `config` on a mesh of `devices` (config.mesh's shape;
    ValueError when the batch does not split over it): what align_jax/plan/planner.py compiles."""

    def build_step(config: ml_collections.ConfigDict, devices: list) -> AbstractStep:
        sharder = build.make_sharder(config, devices)
        cfg, _ = model_config(config, preset)
        return abstract_step(config, sharder, cfg)

    return build_step

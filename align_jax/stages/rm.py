"""RM: a reward model trained on packed preference pairs (Bradley-Terry + absolute-score MSE).

Init: init_from's decoder (an SFT workdir or an HF directory; its LM head is not used) and a fresh
scalar head (align_jax/models/heads.py). The reward of a response is the head's value at its last
target token (align_jax/losses/reward.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from align_jax.batch import PAIR_BATCH
from align_jax.lora import model_apply_fn
from align_jax.losses.reward import reward_loss
from align_jax.metrics import flops_per_token
from align_jax.models.heads import ScalarModel
from align_jax.sharding import tree_shardings
from align_jax.stages import runner
from align_jax.stages.pairs import pair_data
from align_jax.stages.spec import Context, ParamsInit, StageSpec


def boxed_reward_init(model: ScalarModel, rng: jax.Array) -> Any:
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 8))
    return model.init(rng, tokens, positions, jnp.ones_like(tokens))["params"]


def scalar_params(model: ScalarModel, seed: int) -> ParamsInit:
    """A decoder + a fresh scalar head: init_from fills the decoder (its LM head is not the reward head)."""
    boxed = jax.eval_shape(functools.partial(boxed_reward_init, model), jax.random.key(0))
    head_sharding = tree_shardings(boxed, model.sharder)["head"]

    def fresh(rng: jax.Array) -> Any:
        return nn.meta.unbox(boxed_reward_init(model, rng))

    def from_decoder(params: Any) -> Any:
        head = jax.jit(lambda rng: fresh(rng)["head"], out_shardings=head_sharding)(jax.random.key(seed))
        return {"decoder": {k: v for k, v in params.items() if k != "lm_head"}, "head": head}

    return ParamsInit(boxed_abstract=boxed, fresh=fresh, init_from_part="decoder", from_init=from_decoder)


def reward_flops_per_token(cfg, avg_context: float) -> float:
    # The scalar head replaces the LM head: 6 x E x (1 - V) FLOPs less per token.
    return flops_per_token(cfg, avg_context) - 6 * cfg.hidden_size * (cfg.vocab_size - 1)


def spec(ctx: Context) -> StageSpec:
    c = ctx.config
    model = ScalarModel(ctx.model_cfg, ctx.sharder)
    data = pair_data(ctx)
    params = scalar_params(model, int(c.seed))
    loss = functools.partial(
        reward_loss,
        apply_fn=model_apply_fn(model),
        margin=float(c.margin),
        score_weight=float(c.score_weight),
        center_weight=float(c.center_weight),
    )
    return StageSpec(
        batch=PAIR_BATCH,
        loss_fn=loss,
        params=params,
        train_data=data.train,
        eval_data=data.eval,
        flops_per_token=functools.partial(reward_flops_per_token, ctx.model_cfg),
        weight_name="pairs",
        summary=data.summary,
    )


run = runner.stage(spec)

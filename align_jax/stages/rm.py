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
import ml_collections
from flax import linen as nn

from align_jax.losses.reward import reward_loss
from align_jax.metrics import flops_per_token
from align_jax.models.heads import ScalarModel
from align_jax.stages import build, runner
from align_jax.stages.pairs import PairRun
from align_jax.train.step import make_train_step


def boxed_reward_init(model: ScalarModel, rng: jax.Array) -> Any:
    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 8))
    return model.init(rng, tokens, positions, jnp.ones_like(tokens))["params"]


class RMRun(PairRun):
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        self.model = ScalarModel(self.model_cfg, self.sharder)
        boxed = jax.eval_shape(functools.partial(boxed_reward_init, self.model), jax.random.key(0))
        self.setup = build.setup_state(self.model_cfg, self.sharder, config, boxed_abstract=boxed)
        self.loss_fn = functools.partial(
            reward_loss,
            model=self.model,
            margin=float(config.rm.margin),
            score_weight=float(config.rm.score_weight),
            center_weight=float(config.rm.center_weight),
        )
        self.batch_shardings = self.shard_batches()
        self.step_fn = make_train_step(
            self.loss_fn,
            self.setup.optimizer,
            microbatches=int(config.train.microbatches),
            state_shardings=self.setup.state_shardings,
            batch_shardings=self.batch_shardings,
        )
        self.eval_step = jax.jit(
            lambda params, batch: self.loss_fn(params, batch, jax.random.key(0)),
            in_shardings=(self.setup.param_shardings, self.batch_shardings),
        )

    def fresh_params(self, rng: jax.Array) -> Any:
        return nn.meta.unbox(boxed_reward_init(self.model, rng))

    def initial_state(self, checkpointer) -> tuple[Any, dict, str]:
        """Resume; else init_from's decoder + a fresh head; else all fresh."""
        s = self.setup
        head_init = jax.jit(lambda rng: self.fresh_params(rng)["head"], out_shardings=s.param_shardings["head"])

        def from_decoder(params):
            decoder = {k: v for k, v in params.items() if k != "lm_head"}  # an LM's head is not the reward head
            return {"decoder": decoder, "head": head_init(jax.random.key(int(self.config.seed)))}

        return build.initial_state(
            s,
            self.config,
            checkpointer,
            self.workdir,
            fresh_params=self.fresh_params,
            init_abstract_params=s.abstract_params["decoder"],
            params_from_init=from_decoder,
        )

    def flops_per_token(self, avg_context: float) -> float:
        # The scalar head replaces the LM head: 6 x E x (1 - V) FLOPs less per token.
        cfg = self.model_cfg
        return flops_per_token(cfg, avg_context) - 6 * cfg.hidden_size * (cfg.vocab_size - 1)


@runner.locked
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    r = RMRun(config, workdir)
    return runner.drive(r, r.initial_state, summary_extra=r.summary_extra())

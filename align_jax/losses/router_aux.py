"""The router load-balancing loss of a mixture-of-experts policy, added to any stage's loss.

Loss formulas see logits only; the decoder's MoE layers sow their per-layer load-balancing loss
(align_jax/models/moe.py). `with_router_aux` wraps a stage's loss: inside it, every forward of the
trained params records the mean of those losses over layers (`models.apply.router_aux_scope`), and the
wrapper adds `coef * aux` per unit of the loss's weight, so after the step's one division the objective is
loss + coef * aux whatever the microbatching. The unweighted aux is logged as `router_aux_loss`.
"""

from __future__ import annotations

from typing import Any

import jax

from align_jax.models.apply import router_aux_scope
from align_jax.train.step import LossFn


def with_router_aux(loss_fn: LossFn, coef: float) -> LossFn:
    def loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, **kwargs):
        with router_aux_scope(params) as record:
            loss_sum, weight, metrics = loss_fn(params, batch, rng, **kwargs)
        aux = record.mean()
        weighted = aux * weight.astype(aux.dtype)
        return loss_sum + coef * weighted, weight, {**metrics, "router_aux_loss": (weighted, weight)}

    return loss

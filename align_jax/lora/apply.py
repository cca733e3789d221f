"""How a LoRA run calls its model and its loss.

`model_apply_fn(module)` is what stages build their `ApplyFn` with. Without LoRA it is
`models.apply.apply_fn(module)`. With LoRA it looks at the params it is given: a tree with adapters runs
the adapted model; a tree without runs the same module with `lora_rank=0`, which is the base model on
the very same (frozen) weights. That is how DPO's and GRPO's reference works under LoRA: the loss passes
`frozen` (the base) to the same apply function, and no second copy of the weights exists.

`adapter_loss(loss_fn, ...)` turns a stage's loss over full params into one over the trainable tree, with
the frozen base from `TrainState.frozen`: the train step differentiates only the adapters (and the RM's
head / PPO's value model), so the optimizer holds state for those alone.

LoRA dropout needs a key in every forward of the adapted model, which the loss formulas do not pass: the
wrapped loss opens a scope with the step's rng and each adapted forward inside it draws a fresh key from
it. Eval steps and rollouts open no scope: they run without dropout.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
from flax import linen as nn

from align_jax.lora import tree
from align_jax.models.apply import ApplyFn, apply_fn
from align_jax.train.step import LossFn


class _DropoutKeys:
    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def next(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


_DROPOUT: contextvars.ContextVar[_DropoutKeys | None] = contextvars.ContextVar("lora_dropout_keys", default=None)


@contextlib.contextmanager
def dropout_scope(rng: jax.Array | None) -> Iterator[None]:
    """Inside: every forward of an adapted model draws its LoRA dropout key from `rng` (None: no dropout)."""
    token = _DROPOUT.set(None if rng is None else _DropoutKeys(rng))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def model_apply_fn(module: nn.Module) -> ApplyFn:
    """The stage's ApplyFn for `module` (a Decoder or ScalarModel): adapter-aware when its cfg has LoRA."""
    cfg = module.cfg
    adapted = apply_fn(module)
    if not cfg.lora_rank:
        return adapted
    base = apply_fn(module.clone(cfg=cfg.replace(lora_rank=0)))

    def apply(params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, rngs=None, **kw):
        if not tree.has_adapters(params):  # the frozen base alone: the reference, adapters off
            return base(params, tokens, positions, segment_ids, rngs=rngs, **kw)
        keys = _DROPOUT.get()
        if rngs is None and keys is not None and cfg.lora_dropout:
            rngs = {"dropout": keys.next()}
        return adapted(params, tokens, positions, segment_ids, rngs=rngs, **kw)

    apply.final_softcap = adapted.final_softcap
    return apply


def adapter_loss(loss_fn: LossFn, *, part: str | None, reference: bool, dropout: bool) -> LossFn:
    """loss(trainable, batch, rng, *, frozen) = loss_fn(trainable + frozen base, batch, rng[, frozen=base]).

    `reference`: the stage's loss takes a frozen reference (DPO in_step, GRPO/PPO); under LoRA that is
    the base itself, run with adapters off by `model_apply_fn`. `dropout`: LoRA dropout on (train steps;
    eval steps pass False)."""

    def loss(trainable: Any, batch: dict[str, jax.Array], rng: jax.Array, *, frozen: Any):
        params = tree.merge(trainable, frozen, part)
        kwargs = {"frozen": frozen} if reference else {}
        with dropout_scope(rng if dropout else None):
            return loss_fn(params, batch, rng, **kwargs)

    return loss

"""The GRPO and PPO objectives over a scored rollout batch (align_jax/rollout.py makes the batch).

Formulas (clipped policy gradient, KL estimators, GAE, value loss) are in losses/rl.py; this module puts
them together into `loss_fn(params, batch, rng)` for the shared train step, plus the teacher-forced
scoring the rollout does before the update (old and reference log-probs, the per-token KL).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.batch import TOKEN_FIELDS
from align_jax.losses import rl
from align_jax.losses.sft import next_token_map, target_mask, token_nll
from align_jax.models.apply import ApplyFn, forward


@dataclasses.dataclass(frozen=True)
class PolicyObjective:
    """The update's settings (config: the grpo stage's keys of the same names)."""

    policy_loss: str = "ppo_clip"  # ppo_clip | gspo | cispo (losses/rl.py)
    clip_eps: float = 0.2  # ppo_clip's range; cispo's IS-weight bounds
    clip_eps_high: float = 0.0  # 0: = clip_eps
    gspo_clip_eps: float = 3e-4  # gspo's range on the sequence ratio
    gspo_clip_eps_high: float = 4e-4
    normalise: str = "token"  # token | sequence | constant (Dr. GRPO: / (samples x max_new_tokens))
    max_new_tokens: int = 0  # the constant normaliser's length
    tis_cap: float = 0.0  # truncated importance sampling cap on exp(old - sampler); 0: off
    kl_mode: str = "reward"  # reward | loss | none
    kl_estimator: str = "topk"  # k1 | k3 | topk
    kl_coef: float = 0.05
    ptx_coef: float = 0.0
    ptx_kind: str = "kl"  # kl | nll
    vf_coef: float = 0.1  # PPO
    value_clip_eps: float = 0.2  # PPO
    loss_chunk: int = 0  # config.train.loss_chunk: the LM head this many positions at a time (0: all at once)

    @classmethod
    def from_config(cls, c: Any, loss_chunk: int = 0) -> PolicyObjective:
        fields = [f for f in dataclasses.fields(cls) if f.name != "loss_chunk"]
        return cls(**{f.name: type(f.default)(c[f.name]) for f in fields}, loss_chunk=int(loss_chunk))


def _logp(logits: jax.Array, targets: jax.Array) -> jax.Array:
    nll, _ = token_nll(logits, targets)
    return -nll


def token_logps(apply_fn: ApplyFn, params: Any, batch: dict[str, jax.Array], *, loss_chunk: int = 0) -> jax.Array:
    """Log-prob of each next token [B, T-1] under `params`. Every function here reads the logits through
    `next_token_map`, so with `loss_chunk` > 0 no [B, T, V] logits exist (at a 128k vocabulary they are
    the largest buffer of the step), and the numbers are unchanged."""
    return next_token_map(params, batch, _logp, apply_fn=apply_fn, loss_chunk=loss_chunk)


def score_samples(params, ref_params, batch, *, apply_fn: ApplyFn, estimator: str, topk: int, loss_chunk: int = 0):
    """Teacher-forced (old log-probs, reference log-probs, per-token KL), each [B, T-1], no gradient."""
    head = functools.partial(next_token_map, apply_fn=apply_fn, loss_chunk=loss_chunk)
    if estimator == "topk":
        # The reference pass keeps its top-k (values, ids) per position, V/k times less than its logits.
        ref_logp, values, indices = head(ref_params, batch, lambda lg, y: (_logp(lg, y), *rl.reference_topk(lg, topk)))
        logp, kl = head(
            params, batch, lambda lg, y, v, i: (_logp(lg, y), rl.topk_exact_kl(lg, v, i)), (values, indices)
        )
    else:
        logp, ref_logp = head(params, batch, _logp), head(ref_params, batch, _logp)
        kl = rl.kl_estimate(logp, ref_logp, estimator)
    return jax.lax.stop_gradient((logp, ref_logp, kl))


def reference_topk_of(
    ref_params, batch, *, apply_fn: ApplyFn, topk: int, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """The reference's top-k (logits, ids) at every position of an SFT batch, [B, T-1, k] each."""
    return next_token_map(
        ref_params, batch, lambda lg, y: rl.reference_topk(lg, topk), apply_fn=apply_fn, loss_chunk=loss_chunk
    )


def ptx_term(params, batch, *, apply_fn: ApplyFn, kind: str, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over the SFT batch's target tokens of KL(policy || reference) (top-k exact) or NLL."""
    sft = {k: batch[f"ptx_{k}"] for k in TOKEN_FIELDS}
    mask = target_mask(sft).astype(jnp.float32)
    head = functools.partial(next_token_map, params, sft, apply_fn=apply_fn, loss_chunk=loss_chunk)
    if kind == "kl":
        ref = (batch["ptx_ref_values"], batch["ptx_ref_indices"], mask)
        kl = head(lambda lg, y, v, i, m: rl.masked_topk_kl(lg, v, i, m), ref)
        return rl.masked_sum(kl, mask)
    return (-head(_logp) * mask).sum(), mask.sum()


def grpo_loss(
    params, batch, rng, *, apply_fn: ApplyFn, objective: PolicyObjective, frozen: Any = None
) -> tuple[jax.Array, jax.Array, dict]:
    """The policy loss (`policy_loss`: ppo_clip, gspo, cispo) on the rollout batch, each token's term weighted by
    its truncated importance weight when tis_cap > 0 (+ kl_coef x KL when kl_mode = "loss"). The frozen
    reference the state carries is not read here: the rollout already scored the batch under it."""
    del rng, frozen
    o = objective
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)

    def logp_entropy(logits, targets, m):
        return _logp(logits, targets), rl.token_entropy(jax.lax.stop_gradient(logits), m)

    logp, entropy = next_token_map(params, batch, logp_entropy, (mask,), apply_fn=apply_fn, loss_chunk=o.loss_chunk)
    old_logp = batch["old_logp"][:, :-1]
    gspo = o.policy_loss == "gspo"
    weights, tis_metrics = None, {}
    if o.tis_cap:
        weights, tis_metrics = rl.tis_weights(
            old_logp, batch["sampler_logp"][:, :-1], mask, cap=o.tis_cap, per_sequence=gspo
        )
    loss_sum, denom, metrics = rl.policy_gradient_loss(
        logp,
        old_logp,
        batch["advantages"][:, :-1],
        mask,
        kind=o.policy_loss,
        clip_eps=o.gspo_clip_eps if gspo else o.clip_eps,
        clip_eps_high=(o.gspo_clip_eps_high if gspo else o.clip_eps_high) or None,
        normalise=o.normalise,
        max_len=o.max_new_tokens,
        weights=weights,
    )
    metrics.update(tis_metrics)
    if o.kl_mode == "loss":
        kind = "k1" if o.kl_estimator == "k1" else "k3"
        kl_sum, kl_n = rl.kl_loss_term(logp, batch["ref_logp"][:, :-1], mask, kind=kind)
        scale = denom / jnp.maximum(kl_n, 1.0)  # per-token mean, in the objective's own normalisation
        loss_sum = loss_sum + o.kl_coef * kl_sum * scale
        metrics["kl_loss"] = (kl_sum, kl_n)
    if o.ptx_coef:
        ptx_sum, ptx_n = ptx_term(params, batch, apply_fn=apply_fn, kind=o.ptx_kind, loss_chunk=o.loss_chunk)
        # ptx_coef x its per-token mean, in the objective's normalisation (the step divides by denom).
        loss_sum = loss_sum + o.ptx_coef * ptx_sum * denom / jnp.maximum(ptx_n, 1.0)
        metrics[f"ptx_{o.ptx_kind}"] = (ptx_sum, ptx_n)
    metrics["entropy"] = rl.masked_sum(entropy, mask)
    return loss_sum, denom, metrics


def ppo_loss(
    params, batch, rng, *, apply_fn: ApplyFn, value_fn: ApplyFn, objective: PolicyObjective, frozen: Any = None
) -> tuple[jax.Array, jax.Array, dict]:
    """PPO: the clipped policy gradient with per-token (GAE) advantages, plus vf_coef x the clipped value
    loss, both per token in the objective's normalisation; PTX as in GRPO. `params` = {policy, value}."""
    o = objective
    loss_sum, denom, metrics = grpo_loss(params["policy"], batch, rng, apply_fn=apply_fn, objective=o)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    values = forward(value_fn, params["value"], batch)
    v_sum, v_n = rl.value_loss(
        values[:, :-1], batch["old_values"][:, :-1], batch["returns"][:, :-1], mask, clip_eps=o.value_clip_eps
    )
    loss_sum = loss_sum + o.vf_coef * v_sum * denom / jnp.maximum(v_n, 1.0)
    metrics["value_loss"] = (v_sum, v_n)
    metrics["value_mean"] = ((values[:, :-1] * mask).sum(), mask.sum())
    return loss_sum, denom, metrics

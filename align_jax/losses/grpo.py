"""The GRPO and PPO objectives over a scored rollout batch (align_jax/rollout.py makes the batch).

Formulas (clipped policy gradient, KL estimators, GAE, value loss) are in losses/rl.py; this module puts
them together into `loss_fn(params, batch, rng)` for the shared train step, plus the teacher-forced
scoring the rollout does before the update (old and reference log-probs, the per-token KL).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.batch import TOKEN_FIELDS
from align_jax.losses import rl
from align_jax.losses.sft import target_mask, token_nll
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

    @classmethod
    def from_config(cls, c: Any) -> PolicyObjective:
        return cls(**{f.name: type(f.default)(c[f.name]) for f in dataclasses.fields(cls)})


def token_logps(apply_fn: ApplyFn, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(log-prob of each next token [B, T-1], logits [B, T-1, V]) under `params`."""
    logits = forward(apply_fn, params, batch)[:, :-1]
    nll, _ = token_nll(logits, batch["tokens"][:, 1:])
    return -nll, logits


def score_samples(params, ref_params, batch, *, apply_fn: ApplyFn, estimator: str, topk: int):
    """Teacher-forced (old log-probs, reference log-probs, per-token KL), each [B, T-1], no gradient."""
    logp, logits = token_logps(apply_fn, params, batch)
    ref_logp, ref_logits = token_logps(apply_fn, ref_params, batch)
    if estimator == "topk":
        values, indices = rl.reference_topk(ref_logits, topk)
        kl = rl.topk_exact_kl(logits, values, indices)
    else:
        kl = rl.kl_estimate(logp, ref_logp, estimator)
    return jax.lax.stop_gradient((logp, ref_logp, kl))


def reference_topk_of(ref_params, batch, *, apply_fn: ApplyFn, topk: int) -> tuple[jax.Array, jax.Array]:
    """The reference's top-k (logits, ids) at every position of an SFT batch, [B, T-1, k] each."""
    _, logits = token_logps(apply_fn, ref_params, batch)
    return rl.reference_topk(logits, topk)


def ptx_term(params, batch, *, apply_fn: ApplyFn, kind: str) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over the SFT batch's target tokens of KL(policy || reference) (top-k exact) or NLL."""
    sft = {k: batch[f"ptx_{k}"] for k in TOKEN_FIELDS}
    logp, logits = token_logps(apply_fn, params, sft)
    mask = target_mask(sft).astype(jnp.float32)
    if kind == "kl":
        return rl.ptx_kl_term(logits, batch["ptx_ref_values"], batch["ptx_ref_indices"], mask)
    return (-logp * mask).sum(), mask.sum()


def grpo_loss(
    params, batch, rng, *, apply_fn: ApplyFn, objective: PolicyObjective, frozen: Any = None
) -> tuple[jax.Array, jax.Array, dict]:
    """The policy loss (`policy_loss`: ppo_clip, gspo, cispo) on the rollout batch, each token's term weighted by
    its truncated importance weight when tis_cap > 0 (+ kl_coef x KL when kl_mode = "loss"). The frozen
    reference the state carries is not read here: the rollout already scored the batch under it."""
    del rng, frozen
    o = objective
    logp, logits = token_logps(apply_fn, params, batch)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
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
        ptx_sum, ptx_n = ptx_term(params, batch, apply_fn=apply_fn, kind=o.ptx_kind)
        # ptx_coef x its per-token mean, in the objective's normalisation (the step divides by denom).
        loss_sum = loss_sum + o.ptx_coef * ptx_sum * denom / jnp.maximum(ptx_n, 1.0)
        metrics[f"ptx_{o.ptx_kind}"] = (ptx_sum, ptx_n)
    metrics["entropy"] = rl.entropy_from_logits(jax.lax.stop_gradient(logits), mask)
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

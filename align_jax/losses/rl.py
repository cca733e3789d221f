"""Policy-gradient objectives for RL from a reward model: GRPO, PPO, and the KL terms that keep the policy near a
reference.

Pure float32 formulas over completion tokens: token arrays are [B, T] with `mask` [B, T] (1 on real completion
tokens, right-padded). Losses return (sum, count) so the train step divides once (DESIGN.md, "Loss functions");
metrics are {name: (sum, count)}. Hyperparameters are Python numbers fixed at trace time.

Notation: lp = policy log-prob of the sampled token, lo = the behaviour (old) policy's, lr = the reference's,
d = lr - lp, ratio = exp(lp - lo), A = advantage.

Group advantages, GRPO (Shao et al. 2024, DeepSeekMath), n samples per prompt:
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps),  std_g the SAMPLE std (ddof=1), as TRL's `rewards.view(-1, n).std(1)`
KL estimators of KL(policy || ref) from tokens sampled from the policy (Schulman 2020, "Approximating KL"):
    k1 = lp - lr (unbiased, can be < 0);  k2 = (lp - lr)^2 / 2;  k3 = exp(d) - d - 1 >= 0 (unbiased, low variance)
Exact top-k KL (Baichuan Alignment, arXiv 2410.14940): with S = the reference's top-k token ids at a position,
    p_i = softmax_S(policy logits)_i,  q_i = softmax_S(reference logits)_i,  KL_S = sum_{i in S} p_i (log p_i - log q_i)
KL in the reward (InstructGPT, Ouyang et al. 2022; Baichuan): r_t = -kl_coef * KL_t, plus the sequence score at the
    last real token.  DeepSeekMath instead adds kl_coef * mean(k3) to the loss (`kl_loss_term`).
Clipped surrogate (PPO, Schulman et al. 2017; eps_high > eps is DAPO's clip-higher, Yu et al. 2025):
    l_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t,
    with V and A beyond the last real token 0 (the episode ends there; no bootstrap).
Clipped value loss (PPO, as TRL/OpenAI baselines):  0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Metrics = dict[str, tuple[jax.Array, jax.Array]]

# Log-ratios are clamped to +-20 before exp(): beyond ~88 float32 overflows to inf and the loss and gradients turn
# inf/nan. A clamped token gets no gradient (a very loose dual clip); at a ratio of e^20 ~ 5e8 the sample is
# meaningless as an importance weight anyway. Real updates, with ratios near 1, are untouched.
_MAX_LOG_RATIO = 20.0


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _bool_mask(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) > 0


def _clean(x: jax.Array, mask: jax.Array) -> jax.Array:
    # Zero padding BEFORE a formula, not only after: where() stops a padding nan in the value, but its gradient
    # would still be 0 * nan = nan through the formula's own derivative.
    m = _bool_mask(mask)
    x = _f32(x)
    return jnp.where(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x, 0.0)


def _masked_sum(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    # where, not multiply: a padding position may hold inf/nan (e.g. logp of a pad token), and nan * 0 = nan.
    m = _bool_mask(mask)
    return jnp.sum(jnp.where(m, x, 0.0)), jnp.sum(m.astype(jnp.float32))


def group_advantages(
    rewards: jax.Array, group_size: int, *, scale: Literal["std", "none"] = "std", eps: float = 1e-4
) -> jax.Array:
    """GRPO advantages [N] from rewards [N] of `group_size` consecutive samples per prompt.

    (r - group mean) / (group std + eps) with scale="std", r - group mean with "none" (Dr. GRPO, Liu et al. 2025).
    The std is the sample std (ddof=1), as TRL's GRPOTrainer (torch's `.std()` is unbiased); with n=3 as in the
    Baichuan report it is sqrt(3/2) times the population std. A group of identical rewards gets 0, not nan.
    Rewards are constants of the rollout, so no gradient flows through them."""
    if scale not in ("std", "none"):
        raise ValueError(f"group_advantages: scale must be 'std' or 'none', got {scale!r}")
    r = jax.lax.stop_gradient(_f32(rewards))
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"group_advantages: rewards must be [N] with N a multiple of {group_size}, got {r.shape}")
    if scale == "std" and group_size < 2:
        raise ValueError("group_advantages: the sample std of a group needs group_size >= 2 (or scale='none')")
    g = r.reshape(-1, group_size)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale == "std":
        centred = centred / (jnp.std(g, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: Literal["k1", "k2", "k3"] = "k3") -> jax.Array:
    """Per-token estimate [B, T] of KL(policy || ref) from the sampled tokens' log-probs (see module docstring).

    Gradients flow through `logp` only. As a loss, k1's gradient is zero in expectation (it is the score function);
    k3 is what DeepSeekMath's GRPO uses. The caller masks padding."""
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimate: kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    diff = _f32(logp) - jax.lax.stop_gradient(_f32(ref_logp))  # lp - lr
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * jnp.square(diff)
    # Only e^d can overflow; for d -> -inf, k3 ~ -d - 1 stays exact. expm1(d) - d == e^d - d - 1 without the
    # cancellation near d = 0, where k3 ~ d^2/2 is tiny; the max guards against an ulp of rounding below 0.
    d = jnp.minimum(-diff, _MAX_LOG_RATIO)
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def reference_topk(ref_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values [..., k], indices [..., k]) of the reference's k largest logits per position (Baichuan uses k=500):
    what `topk_exact_kl` needs, a V/k-times smaller thing to keep from the reference pass than its full logits."""
    values, indices = jax.lax.top_k(jax.lax.stop_gradient(_f32(ref_logits)), k)
    return values, indices


def topk_exact_kl(policy_logits: jax.Array, ref_topk_logits: jax.Array, ref_topk_indices: jax.Array) -> jax.Array:
    """Exact KL(policy || ref) [B, T] over the reference's top-k ids S at each position, both renormalised over S:

        KL_S = sum_{i in S} p_i (log p_i - log q_i),  p = softmax(policy_logits[S]),  q = softmax(ref_topk_logits)

    Direction: expectation under the policy (the reverse KL the RLHF objective penalises, as k1/k3 estimate).
    `policy_logits` [B, T, V] may be logits or log-probs (renormalising over S removes any per-position constant);
    likewise `ref_topk_logits` [B, T, k]. Equals the full KL when k = V; >= 0 (clamped against float rounding).
    Differentiable in the policy (the PTX term); stop-gradient it to use it as a reward (`kl_in_reward`)."""
    policy_k = jnp.take_along_axis(_f32(policy_logits), ref_topk_indices, axis=-1)
    logp = jax.nn.log_softmax(policy_k, axis=-1)
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(ref_topk_logits)), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.maximum(kl, 0.0)


def ptx_kl_term(
    policy_logits: jax.Array, ref_topk_logits: jax.Array, ref_topk_indices: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of the Baichuan PTX term KL(policy || original model) on SFT tokens, exact over the top-k."""
    kl = topk_exact_kl(_clean(policy_logits, mask), _clean(ref_topk_logits, mask), ref_topk_indices)
    return _masked_sum(kl, mask)


def kl_in_reward(scores: jax.Array, kl: jax.Array, mask: jax.Array, *, kl_coef: float) -> jax.Array:
    """Token rewards [B, T]: -kl_coef * kl at every real token, plus the sequence score [B] at the last real token
    (InstructGPT's / the Baichuan report's shaping). Padding gets 0; a row without real tokens gets nothing.
    Rewards are constants of the rollout: both inputs are stop-gradient'ed."""
    m = _bool_mask(mask)
    kl = jax.lax.stop_gradient(_f32(kl))
    scores = jax.lax.stop_gradient(_f32(scores))
    positions = jnp.arange(m.shape[1])[None, :]
    last = jnp.max(jnp.where(m, positions, -1), axis=1)  # -1 for an empty row: matches no position
    at_last = positions == last[:, None]
    return jnp.where(m, -kl_coef * kl, 0.0) + jnp.where(at_last, scores[:, None], 0.0)


def policy_gradient_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalise: Literal["token", "sequence"] = "token",
) -> tuple[jax.Array, jax.Array, Metrics]:
    """(loss_sum, denominator, metrics) of the clipped surrogate -min(ratio A, clip(ratio, 1-eps, 1+eps_high) A).

    `advantages` is [B] (one per sequence, GRPO) or [B, T] (per token, PPO/GAE); it and `old_logp` are constants.
    clip_eps_high defaults to clip_eps. Normalisation (the step divides the sum by the denominator):
      "token":    sum over all real tokens / number of real tokens: every token weighs the same, so long completions
                  are not down-weighted (DAPO's token-level loss; Dr. GRPO goes further with a constant denominator).
      "sequence": sum over sequences of each sequence's token mean / number of non-empty sequences: GRPO's
                  1/G sum_i 1/|o_i| sum_t (DeepSeekMath), where a token of a short answer weighs more.
    Metrics are token-level whatever `normalise`: ratio, clip_fraction (tokens whose gradient the clip removed),
    its low/high parts, and approx_kl = k3 estimate of KL(old || new) on the old policy's samples.
    |lp - lo| is clamped at 20 (see _MAX_LOG_RATIO), so extreme log-probs give finite losses and gradients."""
    if normalise not in ("token", "sequence"):
        raise ValueError(f"policy_gradient_loss: normalise must be 'token' or 'sequence', got {normalise!r}")
    eps_low, eps_high = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
    m = _bool_mask(mask)
    adv = jax.lax.stop_gradient(_f32(advantages))
    if adv.ndim == 1:
        adv = adv[:, None]
    log_ratio = jnp.where(m, _f32(logp) - jax.lax.stop_gradient(_f32(old_logp)), 0.0)
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)

    if normalise == "token":
        loss_sum, denom = _masked_sum(per_token, m)
    else:
        tok_sum = jnp.sum(jnp.where(m, per_token, 0.0), axis=1)
        n_tok = jnp.sum(m.astype(jnp.float32), axis=1)
        loss_sum = jnp.sum(tok_sum / jnp.maximum(n_tok, 1.0))  # an empty row adds 0, not nan
        denom = jnp.sum((n_tok > 0).astype(jnp.float32))

    r, a = jax.lax.stop_gradient(ratio), jnp.broadcast_to(adv, ratio.shape)
    low = (r < 1.0 - eps_low) & (a < 0)
    high = (r > 1.0 + eps_high) & (a > 0)
    metrics: Metrics = {
        "ratio": _masked_sum(r, m),
        "clip_fraction": _masked_sum((low | high).astype(jnp.float32), m),
        "clip_fraction_low": _masked_sum(low.astype(jnp.float32), m),
        "clip_fraction_high": _masked_sum(high.astype(jnp.float32), m),
        # k3 with the roles swapped: samples come from the old policy, so this estimates KL(old || new).
        "approx_kl": _masked_sum(jnp.expm1(jax.lax.stop_gradient(log_ratio)) - jax.lax.stop_gradient(log_ratio), m),
    }
    return loss_sum, denom, metrics


def kl_loss_term(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, kind: Literal["k1", "k2", "k3"] = "k3"
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over real tokens of the KL-as-loss term (DeepSeekMath GRPO: + kl_coef * this mean, with k3)."""
    return _masked_sum(kl_estimate(_clean(logp, mask), _clean(ref_logp, mask), kind), mask)


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over real tokens of the policy's entropy -sum_v p_v log p_v at each position."""
    logp = jax.nn.log_softmax(_clean(logits, mask), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return _masked_sum(entropy, mask)


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns), both [B, T] and 0 on padding, by generalised advantage estimation.

    The mask must be right-padded (1s then 0s): the episode ends at the last real token, where the next value is 0
    (no bootstrap), as in TRL's PPOTrainer, which zeroes values past the end. A 0 inside a row would end it there.
    Inputs are constants (returns are value targets; advantages weight the policy gradient)."""
    m = _bool_mask(mask)
    r = jnp.where(m, jax.lax.stop_gradient(_f32(rewards)), 0.0)
    v = jnp.where(m, jax.lax.stop_gradient(_f32(values)), 0.0)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1).astype(jnp.float32)
    deltas = r + gamma * next_v - v

    def step(next_adv: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        delta_t, next_m_t = xs
        adv_t = delta_t + gamma * lam * next_m_t * next_adv
        return adv_t, adv_t

    # Scan over time (axis 0 after the transpose), from the end.
    _, adv_TB = jax.lax.scan(step, jnp.zeros_like(r[:, 0]), (deltas.T, next_m.T), reverse=True)
    adv = jnp.where(m, adv_TB.T, 0.0)
    return adv, jnp.where(m, adv + v, 0.0)


def value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip_eps: float
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over real tokens of PPO's clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    The max makes it pessimistic: moving V more than clip_eps from the rollout's V_old earns no gradient when that
    move brings it closer to the return."""
    v = _clean(values, mask)
    v_old = jax.lax.stop_gradient(_clean(old_values, mask))
    ret = jax.lax.stop_gradient(_clean(returns, mask))
    v_clipped = jnp.clip(v, v_old - clip_eps, v_old + clip_eps)
    per_token = 0.5 * jnp.maximum(jnp.square(v - ret), jnp.square(v_clipped - ret))
    return _masked_sum(per_token, mask)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """x normalised to mean 0, variance 1 over its real tokens; 0 on padding.

    The variance is the sample variance (Bessel-corrected, as TRL's `masked_whiten`); shift_mean=False adds the
    mean back (TRL whitens rewards that way, keeping their sign). Statistics are over this call's tokens only."""
    m = _bool_mask(mask)
    x = _clean(x, m)
    total, n = _masked_sum(x, m)
    mean = total / jnp.maximum(n, 1.0)
    sq, _ = _masked_sum(jnp.square(x - mean), m)
    var = sq / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)

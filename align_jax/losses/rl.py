"""Policy-gradient objectives for RL from a reward model: GRPO, PPO and their 2025 variants, the KL terms that keep
the policy near a reference, and the sampler/trainer log-prob agreement. Advantages: losses/advantages.py.

Pure float32 formulas over completion tokens: token arrays are [B, T] with `mask` [B, T] (1 on real completion
tokens, right-padded). Losses return (sum, count) so the train step divides once (DESIGN.md, "Loss functions");
metrics are {name: (sum, count)}. Hyperparameters are Python numbers fixed at trace time.

Notation: lp = policy log-prob of the sampled token, lo = the old policy's (the trainer's, when the rollout was
scored), ls = the sampler's (the behaviour policy that drew the token), lr = the reference's, d = lr - lp,
ratio = exp(lp - lo), A = advantage, sg = stop-gradient, |o_i| = sample i's number of tokens.

KL estimators of KL(policy || ref) from tokens sampled from the policy (Schulman 2020, "Approximating KL"):
    k1 = lp - lr (unbiased, can be < 0);  k2 = (lp - lr)^2 / 2;  k3 = exp(d) - d - 1 >= 0 (unbiased, low variance)
Exact top-k KL (Baichuan Alignment, arXiv 2410.14940): with S = the reference's top-k token ids at a position,
    p_i = softmax_S(policy logits)_i,  q_i = softmax_S(reference logits)_i,  KL_S = sum_{i in S} p_i (log p_i - log q_i)
KL in the reward (InstructGPT, Ouyang et al. 2022; Baichuan): r_t = -kl_coef * KL_t, plus the sequence score at the
    last real token.  DeepSeekMath instead adds kl_coef * mean(k3) to the loss (`kl_loss_term`).
Policy losses, per token (`policy_gradient_loss`, kind=):
    ppo_clip  PPO (Schulman et al. 2017): -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A); eps_high > eps_low
              is DAPO's clip-higher (Yu et al. 2025).
    gspo      GSPO (Zheng et al. 2025): the sequence ratio s_i = exp(mean_t(lp - lo)) over sample i's tokens, in the
              GSPO-token form s_it = sg(s_i) exp(lp_t - sg(lp_t)): value s_i, gradient s_i dlp_t, so
              -min(s_it A_it, clip(s_it) A_it) averaged over the sample's tokens has exactly the gradient of the
              sequence form -min(s_i A_i, clip(s_i) A_i) when A is per sequence, and still works with per-token A
              (KL in the reward). Its epsilons are ~1e-3 (the paper: 3e-4 / 4e-4).
    cispo     CISPO (MiniMax-M1, 2025): -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) A (lp - lo): the clipped IS weight
              is a constant, so every token keeps its gradient -w A dlp (lo only shifts the value: it is 0 at
              ratio 1, as PPO's is -A).
Normalisation: token (DAPO: sum / real tokens), sequence (GRPO: mean over each sample's tokens, then over samples),
    constant (Dr. GRPO, Liu et al. 2025: sum / (samples x max_new_tokens), no length bias).
Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL"):
    each token's term times the constant w_t = min(exp(lo - ls), cap), correcting for a sampler that differs from
    the trainer (numerics, or stale params).
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


def masked_sum(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over real positions, their count)."""
    # where, not multiply: a padding position may hold inf/nan (e.g. logp of a pad token), and nan * 0 = nan.
    m = _bool_mask(mask)
    return jnp.sum(jnp.where(m, x, 0.0)), jnp.sum(m.astype(jnp.float32))


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
    return masked_sum(masked_topk_kl(policy_logits, ref_topk_logits, ref_topk_indices, mask), mask)


def masked_topk_kl(
    policy_logits: jax.Array, ref_topk_logits: jax.Array, ref_topk_indices: jax.Array, mask: jax.Array
) -> jax.Array:
    """`topk_exact_kl` per position [B, T], with padding zeroed before the formula (finite gradients)."""
    return topk_exact_kl(_clean(policy_logits, mask), _clean(ref_topk_logits, mask), ref_topk_indices)


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


PolicyLoss = Literal["ppo_clip", "gspo", "cispo"]
Normalise = Literal["token", "sequence", "constant"]


def _ppo_clip_terms(log_ratio, adv, m, eps_low: float, eps_high: float):
    ratio = jnp.exp(log_ratio)
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    r = jax.lax.stop_gradient(ratio)
    # Clipped = the min picked the clipped branch where it is flat: the token's gradient is gone.
    return per_token, r, (r < 1.0 - eps_low) & (adv < 0), (r > 1.0 + eps_high) & (adv > 0)


def _gspo_terms(log_ratio, adv, m, eps_low: float, eps_high: float):
    n_tok = jnp.sum(m.astype(jnp.float32), axis=1, keepdims=True)
    seq_log = jnp.sum(log_ratio, axis=1, keepdims=True) / jnp.maximum(n_tok, 1.0)  # log s_i; padding holds 0
    token_log = jax.lax.stop_gradient(seq_log) + log_ratio - jax.lax.stop_gradient(log_ratio)
    return _ppo_clip_terms(jnp.where(m, token_log, 0.0), adv, m, eps_low, eps_high)


def _cispo_terms(log_ratio, adv, m, eps_low: float, eps_high: float):
    r = jax.lax.stop_gradient(jnp.exp(log_ratio))
    weight = jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high)
    # Clipped = the IS weight was truncated; unlike PPO's, such a token still has its gradient.
    return -weight * adv * log_ratio, r, r < 1.0 - eps_low, r > 1.0 + eps_high


_TERMS = {"ppo_clip": _ppo_clip_terms, "gspo": _gspo_terms, "cispo": _cispo_terms}


def _normalised_sum(per_token, m, normalise: str, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    if normalise == "token":
        return masked_sum(per_token, m)
    tok_sum = jnp.sum(jnp.where(m, per_token, 0.0), axis=1)
    n_tok = jnp.sum(m.astype(jnp.float32), axis=1)
    n_seq = jnp.sum((n_tok > 0).astype(jnp.float32))  # an all-padding row is not a sample
    if normalise == "sequence":
        return jnp.sum(tok_sum / jnp.maximum(n_tok, 1.0)), n_seq  # an empty row adds 0, not nan
    return jnp.sum(tok_sum), n_seq * float(max_len)


def policy_gradient_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    kind: PolicyLoss = "ppo_clip",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    normalise: Normalise = "token",
    max_len: int | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, Metrics]:
    """(loss_sum, denominator, metrics) of the policy loss `kind` (module docstring: ppo_clip, gspo, cispo).

    `advantages` is [B] (one per sequence, GRPO) or [B, T] (per token, PPO/GAE); it, `old_logp` and `weights`
    [B, T] (per-token constants multiplying each term, e.g. `tis_weights`) are constants. clip_eps_high defaults
    to clip_eps. Normalisation (the step divides the sum by the denominator):
      "token":    sum over all real tokens / number of real tokens: every token weighs the same, so long completions
                  are not down-weighted (DAPO's token-level loss).
      "sequence": sum over samples of each sample's token mean / number of non-empty samples: GRPO's
                  1/G sum_i 1/|o_i| sum_t (DeepSeekMath), where a token of a short answer weighs more; GSPO's.
      "constant": sum over all real tokens / (non-empty samples x max_len): Dr. GRPO's constant normaliser.
    Metrics are token-level whatever `normalise`: ratio (gspo: the sequence ratio), clip_fraction and its low/high
    parts (ppo_clip, gspo: tokens whose gradient the clip removed; cispo: tokens whose IS weight was truncated),
    approx_kl = k3 estimate of KL(old || new) on the old policy's samples.
    |lp - lo| is clamped at 20 (see _MAX_LOG_RATIO), so extreme log-probs give finite losses and gradients."""
    if normalise not in ("token", "sequence", "constant"):
        raise ValueError(
            f"policy_gradient_loss: normalise must be 'token', 'sequence' or 'constant', got {normalise!r}"
        )
    if kind not in _TERMS:
        raise ValueError(f"policy_gradient_loss: kind must be one of {tuple(_TERMS)}, got {kind!r}")
    if normalise == "constant" and not (max_len or 0) > 0:
        raise ValueError("policy_gradient_loss: normalise='constant' needs max_len > 0 (max_new_tokens)")
    eps_low, eps_high = clip_eps, clip_eps if clip_eps_high is None else clip_eps_high
    m = _bool_mask(mask)
    adv = jax.lax.stop_gradient(_f32(advantages))
    adv = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, m.shape)
    log_ratio = jnp.where(m, _f32(logp) - jax.lax.stop_gradient(_f32(old_logp)), 0.0)
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    per_token, r, low, high = _TERMS[kind](log_ratio, adv, m, eps_low, eps_high)
    if weights is not None:
        per_token = per_token * jax.lax.stop_gradient(_clean(weights, m))
    loss_sum, denom = _normalised_sum(per_token, m, normalise, max_len)

    lr = jax.lax.stop_gradient(log_ratio)
    metrics: Metrics = {
        "ratio": masked_sum(r, m),
        "clip_fraction": masked_sum((low | high).astype(jnp.float32), m),
        "clip_fraction_low": masked_sum(low.astype(jnp.float32), m),
        "clip_fraction_high": masked_sum(high.astype(jnp.float32), m),
        # k3 with the roles swapped: samples come from the old policy, so this estimates KL(old || new).
        "approx_kl": masked_sum(jnp.expm1(lr) - lr, m),
    }
    return loss_sum, denom, metrics


def tis_weights(
    old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, cap: float, per_sequence: bool = False
) -> tuple[jax.Array, Metrics]:
    """Truncated importance-sampling weights [B, T] (0 on padding) and their metrics {tis/weight, tis/truncated}.

    w_t = min(exp(lo_t - ls_t), cap): the trainer's old policy over the policy that sampled, truncated so a token the
    sampler found unlikely cannot blow the update up. per_sequence (for gspo, whose ratio is per sequence): one
    weight per sample, min(exp(mean_t(lo - ls)), cap). Constants: both inputs are the rollout's."""
    m = _bool_mask(mask)
    d = jnp.where(m, jax.lax.stop_gradient(_f32(old_logp) - _f32(sampler_logp)), 0.0)
    if per_sequence:
        n_tok = jnp.sum(m.astype(jnp.float32), axis=1, keepdims=True)
        d = jnp.broadcast_to(jnp.sum(d, axis=1, keepdims=True) / jnp.maximum(n_tok, 1.0), m.shape)
    raw = jnp.exp(jnp.clip(d, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    w = jnp.where(m, jnp.minimum(raw, cap), 0.0)
    return w, {"tis/weight": masked_sum(w, m), "tis/truncated": masked_sum((raw > cap).astype(jnp.float32), m)}


def logp_mismatch(sampler_logp: jax.Array, trainer_logp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How far the sampler's log-probs of its own tokens are from the trainer's teacher-forced ones, over real tokens:
    max and mean |ls - lt|, and the k3 estimate of KL(sampler || trainer) (the tokens come from the sampler).
    With the same params and float32 these are float error only; larger values mean the two disagree."""
    m = _bool_mask(mask)
    diff = jnp.where(m, _f32(trainer_logp) - _f32(sampler_logp), 0.0)
    n = jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)
    d = jnp.clip(diff, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return {
        "max": jnp.max(jnp.abs(diff)),
        "mean": jnp.sum(jnp.abs(diff)) / n,
        "kl": jnp.sum(jnp.where(m, jnp.expm1(d) - d, 0.0)) / n,
    }


def kl_loss_term(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, kind: Literal["k1", "k2", "k3"] = "k3"
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over real tokens of the KL-as-loss term (DeepSeekMath GRPO: + kl_coef * this mean, with k3)."""
    return masked_sum(kl_estimate(_clean(logp, mask), _clean(ref_logp, mask), kind), mask)


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over real tokens of the policy's entropy -sum_v p_v log p_v at each position."""
    return masked_sum(token_entropy(logits, mask), mask)


def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The policy's entropy [B, T] at each position (padding zeroed before the formula)."""
    logp = jax.nn.log_softmax(_clean(logits, mask), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


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
    return masked_sum(per_token, mask)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """x normalised to mean 0, variance 1 over its real tokens; 0 on padding.

    The variance is the sample variance (Bessel-corrected, as TRL's `masked_whiten`); shift_mean=False adds the
    mean back (TRL whitens rewards that way, keeping their sign). Statistics are over this call's tokens only."""
    m = _bool_mask(mask)
    x = _clean(x, m)
    total, n = masked_sum(x, m)
    mean = total / jnp.maximum(n, 1.0)
    sq, _ = masked_sum(jnp.square(x - mean), m)
    var = sq / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)

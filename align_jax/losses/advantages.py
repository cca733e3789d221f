"""Advantage estimators and the reward-side pieces of online RL that come before them.

Pure float32 formulas; rewards and log-probs are constants of the rollout (no gradient flows through them).
G = group_size consecutive samples per prompt; token arrays are [B, T] with a right-padded `mask` of real
completion tokens. r = a sample's sequence reward (its score).

GRPO (Shao et al. 2024, DeepSeekMath):  A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std the SAMPLE std
    (ddof=1, as TRL); Dr. GRPO (Liu et al. 2025) drops the std: A_i = r_i - mean_g(r).
RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - 1/(G-1) sum_{j != i} r_j  (= G/(G-1) (r_i - mean_g r)).
REINFORCE++ (Hu 2025): token rewards -kl_coef * KL_t plus r at the last real token, return
    R_t = sum_{s >= t} r_s (gamma = 1), then A = (R - mean_batch R) / std_batch R over every real token of
    the batch: one global normalisation, no per-group std. "-baseline": r_i - mean_g(r) before that.
DAPO (Yu et al. 2025): dynamic sampling keeps only groups whose rewards are not all equal (a constant group
    has zero advantage: it costs compute and dilutes the batch); overlong reward shaping with
    L_max = max_new_tokens and a buffer L_c:  0 if L <= L_max - L_c;  (L_max - L_c - L) / L_c up to L_max;
    -1 beyond, added to r with a weight.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.losses import rl


def _rewards(rewards: jax.Array, group_size: int, name: str) -> jax.Array:
    r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"{name}: rewards must be [N] with N a multiple of {group_size}, got {r.shape}")
    return r


def group_advantages(
    rewards: jax.Array, group_size: int, *, scale: Literal["std", "none"] = "std", eps: float = 1e-4
) -> jax.Array:
    """GRPO advantages [N] from rewards [N] of `group_size` consecutive samples per prompt.

    (r - group mean) / (group std + eps) with scale="std", r - group mean with "none" (Dr. GRPO, Liu et al. 2025).
    The std is the sample std (ddof=1), as TRL's GRPOTrainer (torch's `.std()` is unbiased); with n=3 as in the
    Baichuan report it is sqrt(3/2) times the population std. A group of identical rewards gets 0, not nan."""
    if scale not in ("std", "none"):
        raise ValueError(f"group_advantages: scale must be 'std' or 'none', got {scale!r}")
    r = _rewards(rewards, group_size, "group_advantages")
    if scale == "std" and group_size < 2:
        raise ValueError("group_advantages: the sample std of a group needs group_size >= 2 (or scale='none')")
    g = r.reshape(-1, group_size)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale == "std":
        centred = centred / (jnp.std(g, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """RLOO advantages [N]: each reward minus the mean of the other group_size - 1 rewards of its group.

    The leave-one-out baseline does not depend on the sample it scores, so the estimate stays unbiased; no std."""
    if group_size < 2:
        raise ValueError("rloo_advantages: a leave-one-out baseline needs group_size >= 2")
    g = _rewards(rewards, group_size, "rloo_advantages").reshape(-1, group_size)
    others = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def returns_to_go(token_rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] undiscounted returns R_t = sum_{s >= t} r_s over real tokens; 0 on padding."""
    m = jnp.asarray(mask) > 0
    r = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(token_rewards, jnp.float32)), 0.0)
    return jnp.where(m, jnp.flip(jnp.cumsum(jnp.flip(r, axis=1), axis=1), axis=1), 0.0)


def reinforce_pp_advantages(
    scores: jax.Array, kl: jax.Array, mask: jax.Array, *, kl_coef: float, group_size: int | None = None
) -> jax.Array:
    """REINFORCE++ per-token advantages [B, T] (0 on padding): returns of the token rewards (KL inside, the score
    at the last token) whitened over all real tokens of the batch. With `group_size` (REINFORCE++-baseline) the
    group's mean score is subtracted first. Whitening uses rl.whiten (Bessel-corrected over the tokens)."""
    s = jnp.asarray(scores, jnp.float32)
    if group_size is not None:
        s = s - jnp.repeat(
            jnp.mean(_rewards(s, group_size, "reinforce_pp_advantages").reshape(-1, group_size), 1), group_size
        )
    rewards = rl.kl_in_reward(s, kl, mask, kl_coef=kl_coef)
    return rl.whiten(returns_to_go(rewards, mask), mask)


def informative_groups(scores: jax.Array, group_size: int, *, atol: float = 1e-6) -> jax.Array:
    """[N / group_size] bool: True where a group's rewards are not all equal (within atol), DAPO's filter."""
    g = _rewards(scores, group_size, "informative_groups").reshape(-1, group_size)
    return (jnp.max(g, axis=1) - jnp.min(g, axis=1)) > atol


def fill_groups(informative: np.ndarray, n_groups: int) -> tuple[np.ndarray, int]:
    """(indices of the n_groups groups a batch takes, how many of them are uninformative fillers).

    Informative groups first, in sampling order; when there are too few (the extra sampling rounds ran out), the
    remaining slots take dropped groups in order: their advantages are 0 (GRPO/RLOO) so they add nothing but
    keep the batch its static size."""
    informative = np.asarray(informative, bool)
    if informative.size < n_groups:
        raise ValueError(f"fill_groups: {informative.size} groups sampled, the batch needs {n_groups}")
    keep = np.flatnonzero(informative)[:n_groups]
    filler = np.flatnonzero(~informative)[: n_groups - keep.size]
    return np.concatenate([keep, filler]).astype(np.int64), int(filler.size)


def overlong_penalty(lengths: jax.Array, *, max_len: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong penalty [B] in [-1, 0] of response lengths [B] (module docstring); buffer 0: all 0."""
    length = jnp.asarray(lengths, jnp.float32)
    if buffer <= 0:
        return jnp.zeros_like(length)
    start = float(max_len - buffer)
    ramp = (start - length) / float(buffer)
    return jnp.where(length <= start, 0.0, jnp.where(length <= max_len, ramp, -1.0))

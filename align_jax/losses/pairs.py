"""Per-sequence quantities of a packed preference batch: log-prob sums, lengths, last-token values.

Layout (align_jax/data/preference.py): pair k of a row is segments 2k+1 (chosen, or KTO's completion)
and 2k+2 (rejected, or KTO's KL-baseline sample); `pair_mask[B, P]` says which pairs exist. A
sequence's quantities are reduced over its own segment with a one-hot [B, T, 2P] segment matrix, so one
forward pass over the packed row serves every sequence in it, and attention never crossed a segment, so
each sum equals what the sequence alone would give.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from align_jax.losses.sft import target_mask, token_stats
from align_jax.models.apply import ApplyFn


def num_pairs(batch: dict[str, jax.Array]) -> int:
    return batch["pair_mask"].shape[1]


def segment_onehot(segment_ids_BT: jax.Array, num_segments: int) -> jax.Array:
    """[B, T, S] float32: 1 where token t belongs to segment s+1 (padding, segment 0, belongs to none)."""
    ids_S = jnp.arange(1, num_segments + 1, dtype=segment_ids_BT.dtype)
    return (segment_ids_BT[..., None] == ids_S[None, None, :]).astype(jnp.float32)


def split_pairs(x_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, 2P] per-segment values -> ([B, P] of the chosen members, [B, P] of the rejected ones)."""
    return x_BS[:, 0::2], x_BS[:, 1::2]


def sequence_logps(
    params: Any, batch: dict[str, jax.Array], *, apply_fn: ApplyFn, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token log-probs, number of target tokens), each float32 [B, 2P] per segment.

    Targets are the `loss_mask` tokens (the response); the prompt is context only."""
    nll, _, _ = token_stats(params, batch, apply_fn=apply_fn, loss_chunk=loss_chunk)
    mask = target_mask(batch).astype(jnp.float32)  # [B, T-1], about token t+1
    onehot = segment_onehot(batch["segment_ids"][:, 1:], 2 * num_pairs(batch))
    logps = jnp.einsum("bt,bts->bs", -nll * mask, onehot)
    counts = jnp.einsum("bt,bts->bs", mask, onehot)
    return logps, counts


def last_target_index(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, 2P] int32: the position of each sequence's last target token (its response's end-of-turn
    token), where a reward or value is read. 0 for absent sequences."""
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    t = seg.shape[1]
    onehot = segment_onehot(seg, 2 * num_pairs(batch))
    pos = jnp.arange(t, dtype=jnp.float32)[None, :] * (mask > 0)
    # Positions are < 2^24, so the float32 max is exact.
    return jnp.max(pos[..., None] * onehot, axis=1).astype(jnp.int32)


def values_at(values_BT: jax.Array, index_BS: jax.Array) -> jax.Array:
    """values_BT[b, index_BS[b, s]] -> [B, S]."""
    return jnp.take_along_axis(values_BT, index_BS, axis=1)


def pair_metrics(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    m: jax.Array,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """TRL's DPO metric names, as (sum, count) over the pairs where `m` is 1."""
    n = m.sum()

    def mean(x):
        return ((x * m).sum(), n)

    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }

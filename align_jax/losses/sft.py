"""Next-token cross-entropy on the tokens the batch marks as targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.models.apply import ApplyFn
from align_jax.models.attention import soft_cap


def target_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1] float: 1 where token t+1 is a target predicted from position t.

    `loss_mask[t] = 1` marks token t as a target; a target also needs its predecessor in the same
    (non-padding) segment, so nothing is ever predicted across a packing boundary."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (batch["loss_mask"][:, 1:] > 0) & same


@jax.custom_vjp
def _xent(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll, logZ, correct) of float32 logits. `correct` is 1 where the target's logit is the row's
    maximum (argmax up to exact ties), read off the max the log-partition needs anyway."""
    top = jnp.max(logits_BTV, axis=-1)
    logz = top + jnp.log(jnp.sum(jnp.exp(logits_BTV - top[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz - picked, logz, (picked >= top).astype(jnp.float32)


def _xent_fwd(logits_BTV, targets_BT):
    out = _xent(logits_BTV, targets_BT)
    return out, (logits_BTV, targets_BT, out[1])


def _xent_bwd(res, cotangents):
    # d nll = softmax - onehot(target), d logZ = softmax: one elementwise pass over the logits, where
    # autodiff of take_along_axis would scatter into a zeroed [B, T, V] buffer and add it back.
    logits_BTV, targets_BT, logz = res
    g_nll, g_logz, _ = cotangents
    softmax = jnp.exp(logits_BTV - logz[..., None])
    onehot = jax.lax.broadcasted_iota(targets_BT.dtype, logits_BTV.shape, logits_BTV.ndim - 1) == targets_BT[..., None]
    grad = softmax * (g_nll + g_logz)[..., None] - jnp.where(onehot, g_nll[..., None], 0.0)
    return grad, None


_xent.defvjp(_xent_fwd, _xent_bwd)


def token_xent(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (negative log-likelihood, log-partition, correct), in float32; `correct` is 1 where
    the target has the highest logit."""
    return _xent(logits_BTV.astype(jnp.float32), targets_BT)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, in float32."""
    nll, logz, _ = token_xent(logits_BTV, targets_BT)
    return nll, logz


def lm_head_weight(params: Any) -> jax.Array:
    """[E, V]: the LM head's kernel, or the transposed embedding table when they are tied (a decoder with
    tied embeddings has no lm_head params)."""
    return params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"].T


def chunked_head(
    hidden_BTE: jax.Array,
    w_EV: jax.Array,
    chunk: int,
    fn: Callable[..., Any],
    per_token: tuple[jax.Array, ...] = (),
    softcap: float | None = None,
) -> Any:
    """`fn(logits [B, chunk, V], *per_token chunks)` -> per-position outputs ([B, chunk, ...] leaves),
    with the LM head applied `chunk` positions at a time inside a checkpointed map: only one chunk's
    float32 logits exist, forward or backward, instead of all [B, T, V] (33.6 GB for 16 x 4096 tokens at
    Llama-3's 128k vocabulary). Exact whenever `fn` is per position (the head and every use of it are).
    T must be a multiple of `chunk`; `per_token` leaves are [B, T, ...].

    Chunks are strided, not contiguous: step j reads positions j, j + n, j + 2n, ... (n = T / chunk), so
    each step spans the whole row. When the length is split over the mesh (sequence parallelism), every
    device then computes the head for its own positions in every step; contiguous chunks would each sit
    on one device, and XLA would gather the hidden states so all of them compute every chunk."""
    b, t, _ = hidden_BTE.shape
    n = t // chunk

    def split(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    @jax.checkpoint
    def one(h_BCE, *xs):
        logits = jnp.einsum("bce,ev->bcv", h_BCE, w_EV.astype(h_BCE.dtype), preferred_element_type=jnp.float32)
        return fn(soft_cap(logits, softcap), *xs)

    out = jax.lax.map(lambda xs: one(*xs), (split(hidden_BTE), *(split(x) for x in per_token)))
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2).reshape(b, t, *x.shape[3:]), out)


def chunked_token_stats(
    hidden_BTE: jax.Array, w_EV: jax.Array, targets_BT: jax.Array, chunk: int, softcap: float | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll, logZ, correct) per token, the LM head applied `chunk` positions at a time (`chunked_head`)."""
    return chunked_head(hidden_BTE, w_EV, chunk, token_xent, (targets_BT,), softcap)


def next_token_map(
    params: Any,
    batch: dict[str, jax.Array],
    fn: Callable[..., Any],
    per_token: tuple[jax.Array, ...] = (),
    *,
    apply_fn: ApplyFn,
    loss_chunk: int = 0,
) -> Any:
    """`fn(logits [B, T-1, V], targets [B, T-1], *per_token)` over every position that predicts a next
    token (float32 logits, soft-capped as the decoder's are); `per_token` leaves are [B, T-1, ...].
    With `loss_chunk` > 0 (and T-1 > loss_chunk) the head runs in chunks (`chunked_head`): the same
    numbers, T / loss_chunk times less logits memory. `fn` must treat positions independently."""
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    targets = tokens[:, 1:]
    t = tokens.shape[1] - 1
    if loss_chunk and t > loss_chunk:
        # Every position's hidden state, the last one's too (it predicts nothing; its output is cut off
        # below): slicing it away would shift the rows' layout where the length is split over the mesh.
        hidden = apply_fn(params, tokens, positions, segments, return_hidden=True)

        def padded(x: jax.Array, extra: int) -> jax.Array:
            return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2)) if extra else x

        pad = -(t + 1) % loss_chunk  # 0 for the usual lengths (multiples of the chunk)
        softcap = getattr(apply_fn, "final_softcap", None)  # Gemma 2 caps the logits the decoder would return
        per_token = tuple(padded(x, pad + 1) for x in (targets, *per_token))
        out = chunked_head(padded(hidden, pad), lm_head_weight(params), loss_chunk, fn, per_token, softcap)
        return jax.tree.map(lambda x: x[:, :t], out)
    logits = apply_fn(params, tokens, positions, segments)[:, :-1]
    return fn(logits, targets, *per_token)


def token_stats(
    params: Any, batch: dict[str, jax.Array], *, apply_fn: ApplyFn, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll, logZ, correct), each float32 [B, T-1]: entry t is about predicting token t+1 from position t.

    `loss_chunk` > 0 computes the LM head that many positions at a time (see `chunked_head`);
    the numbers are the same, the logits memory is T / loss_chunk times less."""
    return next_token_map(params, batch, token_xent, apply_fn=apply_fn, loss_chunk=loss_chunk)


def sft_loss(
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: ApplyFn,
    z_loss: float = 0.0,
    loss_chunk: int = 0,
) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Summed NLL of the target tokens, and their count (see `token_stats` for `loss_chunk`)."""
    del rng  # deterministic: no dropout in these models
    nll, logz, correct = token_stats(params, batch, apply_fn=apply_fn, loss_chunk=loss_chunk)
    mask = target_mask(batch).astype(jnp.float32)
    n = mask.sum()
    nll_sum = (nll * mask).sum()
    loss_sum = nll_sum
    metrics = {"nll": (nll_sum, n), "accuracy": ((correct * mask).sum(), n)}
    if z_loss:
        z_sum = (jnp.square(logz) * mask).sum()
        loss_sum = loss_sum + z_loss * z_sum
        metrics["z_loss"] = (z_sum, n)
    return loss_sum, n, metrics

"""Sampling engine: prefill + decode with a KV cache, batched, compiled once per shape.

    out = aj.generate(cfg, params, prompts, max_new_tokens=128, temperature=0.7, top_p=0.9, eos_id=2, seed=0)

The forward is the model's own `Decoder` (same params tree, RoPE, GQA, biases, sliding window, tied
embeddings) run with a KV cache (see align_jax/models/transformer.py), so the numbers are training's.

Layout. Prompts are left-padded to a bucket width P (the next power of two >= 16, or a multiple of
`prompt_bucket`), so every row's last prompt token sits in slot P - 1 and every decode step writes the
same slot P + t for all rows. Positions are per row (each row's first prompt token is at position 0);
pad slots are segment 0, which no real token attends to. The cache holds P + max_new_tokens slots; a
sliding window (Mistral) is a mask over it, not a ring buffer.

Layers. By default (`unstack_layers=True`) the call first copies the stacked [L, ...] layer weights into
per-layer arrays and keeps a per-layer cache, and prefill and decode run the same Blocks unrolled: inside
the decode loop XLA would otherwise copy every layer's weights and cache out of the stacks on every step
(2-3x slower decoding on CPU). `unstack_layers=False` runs the training layer scan (any layers_per_unit)
with a stacked cache in its carry, without the extra copy of the weights.

Compilation. One jit holds prefill and the whole decode loop (a `lax.while_loop` that also stops when
every row is done). It compiles once per (batch, prompt bucket, max_new_tokens, number of eos ids,
sampling kind, layer layout); the sampling kinds are greedy / plain sampling / top-k-or-p filtered. Temperature, top_k, top_p,
the eos ids and the seed are traced values, so changing them does not recompile. `compile_count()`
reports the jit's cache size, for tests.

Sampling follows transformers' order: logits / temperature, then top-k, then top-p (the smallest set of
tokens whose probability reaches top_p, always at least one). Step t draws with
`fold_in(key(seed), t)`, so a fixed seed gives the same samples, sharded or not; with `row_keys=True`
row b draws with fold_in(fold_in(key(seed), b), t), independent of the rows beside it.

Early exit and buckets: the loop stops at the first step where every row is done, but until then a
finished row keeps its place in the batch, and every row pays for the widest prompt's bucket. For many
prompts whose response lengths vary, `align_jax.engine.generate_many` refills finished rows with queued
prompts and prefills each prompt at its own bucket width; same outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.models.attention import init_cache
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import Decoder, constrain_cache, unstack_layers
from align_jax.sharding import Sharder


class GenerateOutput(NamedTuple):
    """What `generate` returns. B = batch, N = max_new_tokens, P = the prompt bucket width."""

    tokens: jax.Array  # [B, N] int32; `pad_id` after a row stops
    # [B, N] float32: log p(token) under the model's UNMODIFIED distribution (temperature 1, no top-k/p),
    # i.e. log_softmax of the logits, as the policy ratio of RL needs; 0 after a row stops.
    logprobs: jax.Array
    lengths: jax.Array  # [B] int32: tokens generated, the eos included
    sequences: jax.Array  # [B, P + N] int32: prompt then completion from column 0, then `pad_id`
    prompt_lengths: jax.Array  # [B] int32


def prompt_bucket_width(length: int, multiple: int | None = None) -> int:
    """The padded prompt width: the next power of two (at least 16), or a multiple of `multiple`."""
    if multiple:
        return max(multiple, -(-length // multiple) * multiple)
    return max(16, 1 << (max(length, 1) - 1).bit_length())


def _filter(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets logits outside the top-k / top-p set to -inf (top_k = 0 and top_p = 1 keep everything).
    One descending sort serves both: top-k keeps the first k sorted entries, top-p then keeps the
    sorted prefix whose probability before each entry is still below top_p."""
    v = logits_BV.shape[-1]
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    rank_V = jnp.arange(v, dtype=jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    sorted_BV = jnp.where((rank_V < k)[None, :], sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (before_BV < top_p) & (rank_V < k)[None, :]
    keep_BV = keep_BV.at[:, 0].set(True)
    n_keep_B = jnp.sum(keep_BV, axis=-1).astype(jnp.int32)
    threshold_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def row_keys(key: jax.Array, rows_B: jax.Array, t_B: jax.Array) -> jax.Array:
    """[B] keys, fold_in(fold_in(key, row), t): a row's draws depend on its own index and step only."""
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(rows_B, t_B)


def sample_tokens(logits_BV, key, temperature, top_k, top_p, greedy: bool, filtered: bool):
    """(token [B] int32, log-prob [B] of that token under the unmodified distribution). `key` is one
    key for the whole batch, or [B] keys (`row_keys`), one per row."""
    if greedy:
        tok_B = jnp.argmax(logits_BV, axis=-1)
    else:
        scaled_BV = logits_BV / temperature
        if filtered:
            scaled_BV = _filter(scaled_BV, top_k, top_p)
        if jnp.ndim(key):
            tok_B = jax.vmap(jax.random.categorical)(key, scaled_BV)
        else:
            tok_B = jax.random.categorical(key, scaled_BV, axis=-1)
    tok_B = tok_B.astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]


def left_pad(prompt_BP: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Right-padded prompts -> (left-padded tokens, positions, segment ids), each [B, P]: row b's
    prompt occupies slots [P - len_b, P), so every row's last prompt token sits in slot P - 1."""
    p = prompt_BP.shape[1]
    pad_B1 = (p - lengths_B)[:, None]
    slot_1P = jnp.arange(p, dtype=jnp.int32)[None, :]
    real_BP = slot_1P >= pad_B1
    src_BP = jnp.clip(slot_1P - pad_B1, 0, p - 1)
    left_BP = jnp.where(real_BP, jnp.take_along_axis(prompt_BP, src_BP, axis=1), 0)
    return left_BP, jnp.where(real_BP, slot_1P - pad_B1, 0), real_BP.astype(jnp.int32)


def is_eos(tok_B: jax.Array, eos_E: jax.Array) -> jax.Array:
    return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)


_STATIC = ("cfg", "sharder", "max_new_tokens", "greedy", "filtered", "unstacked", "per_row")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(
    params,
    prompt_BP,
    lengths_B,
    eos_E,
    pad_id,
    temperature,
    top_k,
    top_p,
    key,
    *,
    cfg,
    sharder,
    max_new_tokens,
    greedy,
    filtered,
    unstacked,
    per_row,
):
    b, p = prompt_BP.shape
    n = max_new_tokens
    model = Decoder(cfg, sharder, unstacked)
    if unstacked:  # one copy of the layer weights per call, instead of one per decode step
        params = unstack_layers(params)
    batch_names = ("activation_batch", None)
    prompt_BP, lengths_B = (
        sharder.constrain(prompt_BP, batch_names),
        sharder.constrain(lengths_B, ("activation_batch",)),
    )

    left_BP, positions_BP, segments_BP = left_pad(prompt_BP, lengths_B)
    cache = init_cache(cfg.num_layers, b, p + n, cfg.num_kv_heads, cfg.head_size, cfg.jnp_dtype, not unstacked)
    cache = constrain_cache(sharder, cache)
    logits_B1V, cache = model.apply({"params": params}, left_BP, positions_BP, segments_BP, cache=cache)
    kv_segments_BS = jnp.concatenate([segments_BP, jnp.ones((b, n), jnp.int32)], axis=1)

    rows_B = jnp.arange(b, dtype=jnp.int32)

    def sample(logits_B1V, t):
        step_key = row_keys(key, rows_B, jnp.full((b,), t, jnp.int32)) if per_row else jax.random.fold_in(key, t)
        return sample_tokens(logits_B1V[:, 0], step_key, temperature, top_k, top_p, greedy, filtered)

    tok_B, logp_B = sample(logits_B1V, 0)
    tokens_BN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok_B)
    logprobs_BN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B)
    done_B = is_eos(tok_B, eos_E)
    state = (jnp.ones((), jnp.int32), tok_B, done_B, jnp.ones((b,), jnp.int32), tokens_BN, logprobs_BN, cache)

    def cond(state):
        t, _, done_B, *_ = state
        return (t < n) & ~jnp.all(done_B)

    def body(state):
        t, prev_B, done_B, count_B, tokens_BN, logprobs_BN, cache = state
        # Token t - 1 goes into slot p + t - 1 at its row's position len_b + t - 1. Finished rows keep
        # running (static shapes) on a harmless token; what they produce is discarded.
        fed_B1 = jnp.where(done_B, 0, prev_B)[:, None]
        positions_B1 = (lengths_B + t - 1)[:, None]
        logits_B1V, cache = model.apply(
            {"params": params},
            fed_B1,
            positions_B1,
            jnp.ones((b, 1), jnp.int32),
            cache=cache,
            cache_index=p + t - 1,
            kv_segment_ids_BS=kv_segments_BS,
        )
        tok_B, logp_B = sample(logits_B1V, t)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        logp_B = jnp.where(done_B, 0.0, logp_B)
        tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, tok_B[:, None], (0, t))
        logprobs_BN = jax.lax.dynamic_update_slice(logprobs_BN, logp_B[:, None], (0, t))
        count_B = count_B + (~done_B).astype(jnp.int32)
        return t + 1, tok_B, done_B | is_eos(tok_B, eos_E), count_B, tokens_BN, logprobs_BN, cache

    _, _, _, count_B, tokens_BN, logprobs_BN, _ = jax.lax.while_loop(cond, body, state)

    # prompt + completion from column 0: shift each left-padded row left by its padding.
    pad_B1 = (p - lengths_B)[:, None]
    idx_1W = jnp.arange(p + n, dtype=jnp.int32)[None, :]
    both_BW = jnp.concatenate([left_BP, tokens_BN], axis=1)
    src_BW = jnp.clip(idx_1W + pad_B1, 0, p + n - 1)
    in_row_BW = idx_1W < (lengths_B + count_B)[:, None]
    sequences_BW = jnp.where(in_row_BW, jnp.take_along_axis(both_BW, src_BW, axis=1), pad_id)
    return GenerateOutput(tokens_BN, logprobs_BN, count_B, sequences_BW, lengths_B)


def compile_count() -> int:
    """How many programs the generation jit holds (one per distinct shape / sampling kind)."""
    return _generate._cache_size()


def eos_array(eos_id: int | Iterable[int] | None, cfg: ModelConfig) -> np.ndarray:
    """[E] int32 eos ids ([-1], which no token matches, for none)."""
    if eos_id is None:
        eos_id = cfg.eos_token_id
    ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, (int, np.integer)) else sorted(set(eos_id))
    for i in ids:
        if not 0 <= int(i) < cfg.vocab_size:
            raise ValueError(f"generate: eos id {i} is outside the vocabulary [0, {cfg.vocab_size})")
    return np.asarray(ids or [-1], np.int32)  # -1 matches no token: no eos


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )


def check_token_ids(tokens: Any, cfg: ModelConfig) -> None:
    if isinstance(tokens, np.ndarray) and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"generate: prompt token ids must be in [0, {cfg.vocab_size})")


def default_pad_id(cfg: ModelConfig, pad_id: int | None) -> int:
    if pad_id is None:
        return cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return pad_id


def prompt_arrays(prompt_tokens: Any, prompt_lengths: Any, bucket: int | None) -> tuple[Any, np.ndarray]:
    """(right-padded prompts [B, P_bucket], lengths [B]) from token lists or a padded array."""
    if isinstance(prompt_tokens, (list, tuple)) and (not prompt_tokens or not np.isscalar(prompt_tokens[0])):
        if prompt_lengths is not None:
            raise ValueError("generate: prompt_lengths is for a padded array; token lists carry their lengths")
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt_tokens]
        if not rows:
            raise ValueError("generate: no prompts")
        lengths = np.asarray([len(r) for r in rows], np.int32)
        width = prompt_bucket_width(int(lengths.max()), bucket)
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = prompt_tokens if isinstance(prompt_tokens, jax.Array) else np.asarray(prompt_tokens)
        if tokens.ndim != 2:
            raise ValueError(
                f"generate: prompt_tokens must be token lists or a [batch, length] array, got {tokens.shape}"
            )
        b, t = tokens.shape
        lengths = np.full((b,), t, np.int32) if prompt_lengths is None else np.asarray(prompt_lengths, np.int32)
        if lengths.shape != (b,):
            raise ValueError(f"generate: prompt_lengths has shape {lengths.shape}; expected ({b},)")
        if np.any(lengths > t):
            raise ValueError(f"generate: a prompt length exceeds the array width {t}: {lengths.tolist()}")
        width = prompt_bucket_width(t, bucket)
        if width != t:
            xp = jnp if isinstance(tokens, jax.Array) else np
            tokens = xp.pad(tokens.astype(np.int32), ((0, 0), (0, width - t)))
    if np.any(lengths < 1):
        raise ValueError(f"generate: every prompt needs at least one token; lengths {lengths.tolist()}")
    return tokens, lengths


def generate(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: Sequence[Sequence[int]] | jax.Array | np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    seed: int = 0,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    pad_id: int | None = None,
    prompt_bucket: int | None = None,
    sharder: Sharder = Sharder(),
    unstack_layers: bool = True,
    row_keys: bool = False,
) -> GenerateOutput:
    """Samples `max_new_tokens` tokens after each prompt (see the module docstring).

    prompt_tokens: a list of token lists (any lengths), or an int array [B, T] whose row b holds its
        prompt in the first `prompt_lengths[b]` columns (all T when prompt_lengths is None).
    temperature: 0 is greedy (argmax); otherwise logits are divided by it before top-k/top-p and sampling.
    top_k: keep the k most likely tokens (0: all). top_p: nucleus sampling threshold (1.0: off).
    eos_id: an id or a set of ids that ends a row (included in its tokens and length); None uses
        `cfg.eos_token_id`; () disables. pad_id fills tokens after a row ends (default cfg.pad_token_id or 0).
    prompt_bucket: pad the prompt width up to a multiple of this instead of the next power of two.
    sharder: the mesh the params live on; the batch is split over its batch axes.
    unstack_layers: run the layers from per-layer weight arrays (copied once per call from the stacked
        params: one more copy of the layer weights in memory during the call) instead of the stacked
        layer scan, which copies every layer's weights out of the stack on each decode step.
    row_keys: draw row b's token t with fold_in(fold_in(key(seed), b), t) instead of one key per step
        for the whole batch: a row's samples then depend on its index only, not on the rows beside it
        (what `align_jax.engine.generate_many` does per prompt). Greedy decoding is the same either way.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    tokens, lengths = prompt_arrays(prompt_tokens, prompt_lengths, prompt_bucket)
    check_token_ids(tokens, cfg)
    pad_id = default_pad_id(cfg, pad_id)
    greedy = temperature == 0.0
    if sharder.mesh is not None:
        tokens = jax.device_put(tokens, sharder.sharding(("activation_batch", None), tokens.shape))
    return _generate(
        params,
        tokens,
        lengths,
        eos_array(eos_id, cfg),
        np.int32(pad_id),
        np.float32(1.0 if greedy else temperature),
        np.int32(top_k),
        np.float32(top_p),
        jax.random.key(seed),
        cfg=cfg,
        sharder=sharder,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
        filtered=not greedy and (top_k > 0 or top_p < 1.0),
        unstacked=unstack_layers,
        per_row=row_keys,
    )

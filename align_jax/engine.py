"""Continuous batching: many prompts through a fixed number of decode slots that are refilled as rows end.

    out = generate_many(cfg, params, prompts, max_new_tokens=128, temperature=1.0, eos_id=2, slots=16)

Why. `generate` runs a batch until its longest row ends: with response lengths that vary (RL rollouts),
most rows sit finished while one row decodes. Here a row that ends gives its slot to the next queued
prompt, so the slots stay busy; the outputs are `generate`'s (see Sampling).

Layout. B slots share one KV cache of S = P + N + chunk slots (P the widest prompt bucket, N the most new
tokens). Every decode step writes one cache slot, the clock c, for all rows, as `generate` does, so the
model's single cache index works unchanged. A prompt enters a free slot through a prefill of its own
(`prefill_rows` prompts of similar length, at their own bucket width W <= P: short prompts do not pay for
long ones), whose keys and values are copied into the row's cache slots [c - W, c), left-padded so that
its first decode step writes slot c. The row's kv segment ids mark slots from its prompt's first token on
as its own, so it never sees the slot's previous occupant; slot order is causal order, so the sliding
window needs nothing else. When the clock would run past S, every row is shifted left by the oldest live
row's start (a roll of the whole cache; live rows span at most P + N - 2 slots, so the chunk's slack
bounds how often).

Host loop. Decoding runs in chunks of at most `chunk` steps (one while_loop program) that stop as soon as
enough slots are free to refill (or every row is done); the host then copies finished rows out, prefills
the next prompts into free slots and starts the next chunk: a round trip per chunk, not per token.

Sampling. Prompt i's token t is drawn with fold_in(fold_in(key(seed), i), t), as `generate(...,
row_keys=True)` draws row i's: a prompt's output does not depend on its slot, its neighbours or when it
ran. Greedy decoding equals `generate`'s token for token; log-probs are the same unmodified-distribution
log-probs. Compilation: one decode-chunk program per (slots, S, sampling kind, layer layout), one prefill
program per (prefill_rows, W, N), one roll program; `compile_count()` counts them all.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.generate import (
    GenerateOutput,
    check_sampling,
    check_token_ids,
    default_pad_id,
    eos_array,
    is_eos,
    left_pad,
    prompt_arrays,
    prompt_bucket_width,
    row_keys,
    sample_tokens,
)
from align_jax.models.attention import init_cache
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import Decoder, constrain_cache, unstack_layers
from align_jax.sharding import Sharder


class Rows(NamedTuple):
    """Per-slot decode state, each [B] (tokens, logprobs [B, N]); small, so not donated."""

    start: jax.Array  # first cache slot of the row's prompt (its kv segment starts there)
    plen: jax.Array  # prompt length: the token fed at step t sits at position plen + t - 1
    count: jax.Array  # tokens generated so far
    limit: jax.Array  # max new tokens of this row's prompt
    prev: jax.Array  # the last sampled token, fed next
    done: jax.Array  # bool; True for a free slot
    pid: jax.Array  # prompt index (the sampling key's row)
    tokens: jax.Array  # [B, N] int32, pad after the row ends
    logprobs: jax.Array  # [B, N] float32, 0 after the row ends


class Sampling(NamedTuple):
    """The traced sampling settings (changing them does not recompile)."""

    eos: jax.Array
    pad_id: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    key: jax.Array


_STATIC = ("cfg", "sharder", "greedy", "filtered", "unstacked")


def _sample(logits_BV, s: Sampling, pid_B, t_B, greedy: bool, filtered: bool):
    keys_B = row_keys(s.key, pid_B, t_B)
    return sample_tokens(logits_BV, keys_B, s.temperature, s.top_k, s.top_p, greedy, filtered)


@functools.partial(jax.jit, static_argnames=("cfg", "sharder", "slots", "length", "n", "unstacked"))
def _init(pad_id, *, cfg, sharder, slots, length, n, unstacked):
    cache = init_cache(cfg.num_layers, slots, length, cfg.num_kv_heads, cfg.head_size, cfg.jnp_dtype, not unstacked)
    zeros = jnp.zeros((slots,), jnp.int32)
    rows = Rows(zeros, zeros, zeros, zeros, zeros, jnp.ones((slots,), bool), zeros,
                jnp.full((slots, n), pad_id, jnp.int32), jnp.zeros((slots, n), jnp.float32))  # fmt: skip
    return constrain_cache(sharder, cache), rows


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(1,))
def _prefill(params, cache, rows: Rows, prompt_GW, len_G, pid_G, limit_G, slot_G, clock, s: Sampling, *, cfg,
             sharder, greedy, filtered, unstacked):  # fmt: skip
    """Prefills G prompts (right-padded [G, W]) into slots `slot_G` (slot B: a dummy row, dropped), their
    keys and values into cache slots [clock - W, clock); samples each one's first token."""
    g, w = prompt_GW.shape
    left_GW, positions_GW, segments_GW = left_pad(prompt_GW, len_G)
    small = init_cache(cfg.num_layers, g, w, cfg.num_kv_heads, cfg.head_size, cfg.jnp_dtype, not unstacked)
    model = Decoder(cfg, sharder, unstacked)
    logits_G1V, small = model.apply({"params": params}, left_GW, positions_GW, segments_GW, cache=small)
    tok_G, logp_G = _sample(logits_G1V[:, 0], s, pid_G, jnp.zeros_like(pid_G), greedy, filtered)
    cols_W = clock - w + jnp.arange(w, dtype=jnp.int32)

    def put(big, new):  # [(L,) B, K, S, H] <- [(L,) G, K, W, H] at rows slot_G, columns cols_W
        lead = (slice(None),) * (big.ndim - 4)
        new = jnp.moveaxis(new, (-4, -2), (0, 1))  # advanced indices first: [G, W, (L,) K, H]
        return big.at[(*lead, slot_G[:, None], slice(None), cols_W[None, :])].set(new, mode="drop")

    cache = jax.tree.map(put, cache, small)
    n = rows.tokens.shape[1]

    def upd(a, v):
        return a.at[slot_G].set(v, mode="drop")

    rows = Rows(
        upd(rows.start, clock - len_G),
        upd(rows.plen, len_G),
        upd(rows.count, jnp.ones_like(len_G)),
        upd(rows.limit, limit_G),
        upd(rows.prev, tok_G),
        upd(rows.done, is_eos(tok_G, s.eos) | (limit_G <= 1)),
        upd(rows.pid, pid_G),
        upd(rows.tokens, jnp.full((g, n), s.pad_id, jnp.int32).at[:, 0].set(tok_G)),
        upd(rows.logprobs, jnp.zeros((g, n), jnp.float32).at[:, 0].set(logp_G)),
    )
    return constrain_cache(sharder, cache), rows


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(1,))
def _decode(params, cache, rows: Rows, clock, max_steps, refill_at, s: Sampling, *, cfg, sharder, greedy, filtered,
            unstacked):  # fmt: skip
    """Up to `max_steps` decode steps from cache slot `clock`; stops early once `refill_at` slots are free
    or every row is done. Returns (cache, rows, steps taken)."""
    b, n = rows.tokens.shape
    model = Decoder(cfg, sharder, unstacked)
    length = jax.tree.leaves(cache)[0].shape[-2]
    kv_segments_BS = (jnp.arange(length, dtype=jnp.int32)[None, :] >= rows.start[:, None]).astype(jnp.int32)
    row_B = jnp.arange(b, dtype=jnp.int32)

    def cond(carry):
        i, _, r = carry
        return (i < max_steps) & (jnp.sum(r.done) < refill_at) & ~jnp.all(r.done)

    def body(carry):
        i, cache, r = carry
        # As in `generate`: finished rows run on a harmless token; what they produce is dropped.
        logits_B1V, cache = model.apply(
            {"params": params},
            jnp.where(r.done, 0, r.prev)[:, None],
            (r.plen + r.count - 1)[:, None],
            jnp.ones((b, 1), jnp.int32),
            cache=cache,
            cache_index=clock + i,
            kv_segment_ids_BS=kv_segments_BS,
        )
        tok_B, logp_B = _sample(logits_B1V[:, 0], s, r.pid, r.count, greedy, filtered)
        col_B = jnp.where(r.done, n, r.count)  # column n: dropped
        count_B = r.count + (~r.done).astype(jnp.int32)
        r = r._replace(
            count=count_B,
            prev=jnp.where(r.done, r.prev, tok_B),
            done=r.done | is_eos(tok_B, s.eos) | (count_B >= r.limit),
            tokens=r.tokens.at[row_B, col_B].set(tok_B, mode="drop"),
            logprobs=r.logprobs.at[row_B, col_B].set(logp_B, mode="drop"),
        )
        return i + 1, cache, r

    steps, cache, rows = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), cache, rows))
    return cache, rows, steps


@functools.partial(jax.jit, donate_argnums=(0,))
def _roll(cache, rows: Rows, shift):
    """Moves every row's cache `shift` slots to the left (what falls off the front is dead)."""
    cache = jax.tree.map(lambda x: jnp.roll(x, -shift, axis=-2), cache)
    return cache, rows._replace(start=rows.start - shift)


_unstack = jax.jit(unstack_layers)


def compile_count() -> int:
    """How many programs the engine's jits hold (decode chunk, prefills, roll, init, unstack)."""
    return sum(f._cache_size() for f in (_init, _prefill, _decode, _roll, _unstack))


class _Engine:
    """The host side: the prompt queue, which prompt each slot holds, the clock, the collected outputs."""

    def __init__(self, cfg, params, tokens, lengths, limits, samp: Sampling, opts: dict):
        self.cfg, self.params, self.samp, self.opts = cfg, params, samp, opts
        self.tokens, self.lengths, self.limits = tokens, lengths, limits
        self.b, self.g, self.chunk = opts["slots"], opts["prefill_rows"], opts["chunk"]
        self.p, self.n = tokens.shape[1], int(limits.max())
        order = np.argsort(-lengths, kind="stable") if opts["sort_by_length"] else np.arange(len(lengths))
        self.queue = [int(i) for i in order]  # similar lengths together: prefill groups share a bucket
        self.static = dict(cfg=cfg, sharder=opts["sharder"], unstacked=opts["unstacked"])
        self.sample_kind = dict(greedy=opts["greedy"], filtered=opts["filtered"])
        state = _init(samp.pad_id, **self.static, slots=self.b, length=self.p + self.n + self.chunk, n=self.n)
        # Committed, as the later programs' outputs are: else the first prefill compiles a second program.
        self.cache, self.rows = jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)
        self.clock = self.p  # the cache slot the next decode step writes (prompts end just before it)
        self.start = np.zeros(self.b, np.int64)  # host copy of rows.start, for the roll
        self.slot_pid = np.full(self.b, -1)  # the prompt each slot holds; -1: free
        m = len(lengths)
        self.out_tokens = np.full((m, self.n), int(samp.pad_id), np.int32)
        self.out_logprobs = np.zeros((m, self.n), np.float32)
        self.out_lengths = np.zeros(m, np.int32)

    def run(self) -> None:
        while True:
            self.fill()
            if not np.any(self.slot_pid >= 0):
                return
            self.decode()

    def fill(self) -> None:
        """Prefills queued prompts into free slots, `prefill_rows` at a time at their group's bucket width."""
        while self.queue:
            free = np.flatnonzero(self.slot_pid < 0)
            g = min(self.g, len(self.queue))
            if len(free) < g:
                return
            take, self.queue = np.asarray(self.queue[:g]), self.queue[g:]
            w = min(self.p, prompt_bucket_width(int(self.lengths[take].max()), self.opts["bucket"]))
            pad = self.g - g  # dummy rows (slot B: dropped) keep the prefill's shape fixed
            prompt = np.zeros((self.g, w), np.int32)
            prompt[:g] = self.tokens[take, :w]
            lens = np.concatenate([self.lengths[take], np.ones(pad, np.int32)]).astype(np.int32)
            pids = np.concatenate([take, np.zeros(pad, np.int64)]).astype(np.int32)
            limits = np.concatenate([self.limits[take], np.ones(pad, np.int32)]).astype(np.int32)
            slots = np.concatenate([free[:g], np.full(pad, self.b)]).astype(np.int32)
            self.cache, self.rows = _prefill(self.params, self.cache, self.rows, prompt, lens, pids, limits, slots,
                                             np.int32(self.clock), self.samp, **self.static, **self.sample_kind)  # fmt: skip
            self.start[free[:g]] = self.clock - self.lengths[take]
            self.slot_pid[free[:g]] = take

    def decode(self) -> None:
        """One decode chunk, then copies out the rows that ended."""
        length = self.p + self.n + self.chunk
        if self.clock + self.chunk > length:
            # Live rows span at most P + N - 2 slots (see the module docstring), so this frees >= chunk.
            live = self.start[self.slot_pid >= 0]
            shift = int(min(live.min() if live.size else self.clock, self.clock - self.p))
            self.cache, self.rows = _roll(self.cache, self.rows, np.int32(shift))
            self.start -= shift
            self.clock -= shift
        refill_at = min(self.g, len(self.queue)) if self.queue else self.b + 1
        self.cache, self.rows, steps = _decode(self.params, self.cache, self.rows, np.int32(self.clock),
                                               np.int32(self.chunk), np.int32(refill_at), self.samp, **self.static,
                                               **self.sample_kind)  # fmt: skip
        done, steps = np.asarray(self.rows.done), int(steps)
        self.clock += steps
        ended = np.flatnonzero(done & (self.slot_pid >= 0))
        if ended.size:
            pids = self.slot_pid[ended]
            self.out_tokens[pids] = np.asarray(self.rows.tokens)[ended]
            self.out_logprobs[pids] = np.asarray(self.rows.logprobs)[ended]
            self.out_lengths[pids] = np.asarray(self.rows.count)[ended]
            self.slot_pid[ended] = -1

    def output(self) -> GenerateOutput:
        """`generate`'s output, as host arrays; sequences are prompt + completion from column 0."""
        m, w = len(self.lengths), self.p + self.n
        cols = np.arange(w)[None, :]
        plen, end = self.lengths[:, None], (self.lengths + self.out_lengths)[:, None]
        prompt = np.take_along_axis(self.tokens, np.minimum(cols, self.p - 1).repeat(m, 0), axis=1)
        reply = np.take_along_axis(self.out_tokens, np.clip(cols - plen, 0, self.n - 1), axis=1)
        pad = int(self.samp.pad_id)
        seqs = np.where(cols < plen, prompt, np.where(cols < end, reply, pad)).astype(np.int32)
        return GenerateOutput(self.out_tokens, self.out_logprobs, self.out_lengths, seqs, self.lengths)


def generate_many(
    cfg: ModelConfig,
    params: Any,
    prompt_tokens: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    seed: int = 0,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    pad_id: int | None = None,
    prompt_bucket: int | None = None,
    prompt_width: int | None = None,
    slots: int = 8,
    chunk: int = 16,
    prefill_rows: int = 1,
    sort_by_length: bool = True,
    sharder: Sharder = Sharder(),
    unstack_layers: bool = True,
) -> GenerateOutput:
    """`generate` over any number of prompts through `slots` decode rows that are refilled as rows end
    (see the module docstring). Same arguments and output as `generate` (host numpy arrays, one row per
    prompt, in the prompts' order), and:

    max_new_tokens: one limit for all prompts, or one per prompt (N = the largest).
    prompt_bucket: prefill widths are multiples of this (default: powers of two, at least 16), per group.
    prompt_width: P, the prompt part of the cache and of `sequences` (default: the bucket of the longest
        prompt). A fixed P (the longest prompt a caller ever passes) keeps the decode program and the
        output width the same across calls whatever the prompts; short prompts still prefill narrow.
    slots: decode rows (the batch of every decode step). chunk: most decode steps between host round
        trips; it also adds `chunk` cache slots of slack between rolls. prefill_rows: prompts per prefill
        call (the engine refills once this many slots are free, or all the queue has left).
    sort_by_length: queue the longest prompts first, so prefill groups share a bucket; outputs do not
        depend on the order (each prompt's samples are keyed by its index).
    """
    check_sampling(temperature, top_k, top_p)
    if slots < 1 or chunk < 1 or not 1 <= prefill_rows <= slots:
        raise ValueError(f"generate_many: need slots >= 1, chunk >= 1, 1 <= prefill_rows <= slots; got "
                         f"{slots}, {chunk}, {prefill_rows}")  # fmt: skip
    tokens, lengths = prompt_arrays(prompt_tokens, prompt_lengths, prompt_bucket)
    tokens = np.asarray(tokens, np.int32)
    if prompt_width is not None:
        if prompt_width < lengths.max():
            raise ValueError(f"generate_many: prompt_width {prompt_width} < the longest prompt ({lengths.max()})")
        tokens = np.pad(tokens, ((0, 0), (0, max(0, prompt_width - tokens.shape[1]))))[:, :prompt_width]
    check_token_ids(tokens, cfg)
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), lengths.shape).copy()
    if np.any(limits < 1):
        raise ValueError(f"generate_many: max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = temperature == 0.0
    samp = Sampling(eos_array(eos_id, cfg), np.int32(default_pad_id(cfg, pad_id)),
                    np.float32(1.0 if greedy else temperature), np.int32(top_k), np.float32(top_p),
                    jax.random.key(seed))  # fmt: skip
    opts = dict(slots=slots, chunk=chunk, prefill_rows=prefill_rows, sort_by_length=sort_by_length,
                sharder=sharder, unstacked=unstack_layers, bucket=prompt_bucket, greedy=greedy,
                filtered=not greedy and (top_k > 0 or top_p < 1.0))  # fmt: skip
    engine = _Engine(cfg, _unstack(params) if unstack_layers else params, tokens, lengths, limits, samp, opts)
    engine.run()
    return engine.output()

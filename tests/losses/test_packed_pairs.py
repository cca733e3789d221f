"""Packed preference batches compute what their sequences compute alone; the DPO step leaves the reference alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import align_jax as aj
from align_jax.losses import preference as formulas
from align_jax.losses.dpo import LOSS_TYPES, Objective, preference_loss
from align_jax.losses.pairs import last_target_index, sequence_logps, split_pairs, values_at
from align_jax.losses.reward import pair_rewards, reward_loss
from align_jax.models.apply import apply_fn
from align_jax.models.heads import ScalarModel
from align_jax.models.transformer import Decoder
from align_jax.train.optim import make_optimizer
from align_jax.train.state import TrainState
from align_jax.train.step import make_train_step

CFG = aj.ModelConfig(
    vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)
T, P = 64, 3


def make_pairs(n, seed=0):
    """n pairs of (ids, mask) sequences sharing a prompt; the mask is on the response."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(1, 61, size=rng.integers(2, 6))
        pair = []
        for _ in range(2):
            resp = rng.integers(1, 61, size=rng.integers(2, 7))
            ids = np.concatenate([prompt, resp]).astype(np.int32)
            mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(resp))]).astype(np.int32)
            pair.append((ids, mask))
        out.append(pair)
    return out


def packed_batch(rows, scores=None):
    """rows: list (per row) of lists of pairs -> a batch in the preference layout."""
    b = len(rows)
    batch = {k: np.zeros((b, T), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    batch.update(pair_mask=np.zeros((b, P), np.int32), kto_label=np.zeros((b, P), np.int32))
    batch.update(score_mask=np.zeros((b, P), np.int32), example_id=np.full((b, P), -1, np.int32))
    batch.update(chosen_score=np.zeros((b, P), np.float32), rejected_score=np.zeros((b, P), np.float32))
    for r, pairs in enumerate(rows):
        pos = 0
        for k, pair in enumerate(pairs):
            for j, (ids, mask) in enumerate(pair):
                n = len(ids)
                batch["tokens"][r, pos : pos + n] = ids
                batch["positions"][r, pos : pos + n] = np.arange(n)
                batch["segment_ids"][r, pos : pos + n] = 2 * k + 1 + j
                batch["loss_mask"][r, pos : pos + n] = mask
                batch["loss_mask"][r, pos] = 0
                pos += n
            batch["pair_mask"][r, k] = 1
            if scores is not None:
                batch["score_mask"][r, k] = 1
                batch["chosen_score"][r, k], batch["rejected_score"][r, k] = scores
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def params():
    return aj.init_params(CFG, jax.random.key(0))


def test_packed_logps_equal_each_sequence_alone(params):
    pairs = make_pairs(5)
    model = Decoder(CFG)
    packed = packed_batch([pairs[:3], pairs[3:]])
    seq_logps = jax.jit(functools.partial(sequence_logps, apply_fn=apply_fn(model)))
    logps, counts = seq_logps(params, packed)
    for i, pair in enumerate(pairs):
        r, k = (0, i) if i < 3 else (1, i - 3)
        for j, (ids, mask) in enumerate(pair):
            alone = packed_batch([[(pair[j], pair[j])]])  # the sequence in row 0 as pair 0 (twice: a full pair)
            lp, cnt = seq_logps(params, alone)
            # Direct computation: log-softmax of the unpacked sequence's logits.
            logits = aj.forward(CFG, params, jnp.asarray(ids)[None])[0, :-1]
            direct = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids)[1:, None], axis=-1)[:, 0]
            want = float((direct * mask[1:]).sum())
            np.testing.assert_allclose(float(logps[r, 2 * k + j]), want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(lp[0, 0]), want, rtol=1e-5, atol=1e-5)
            assert int(counts[r, 2 * k + j]) == int(mask[1:].sum()) == int(cnt[0, 0])
    # Absent pairs contribute nothing.
    assert float(jnp.abs(logps[1, 4:]).sum()) == 0.0


def test_reward_at_last_token_under_packing_equals_unpacked():
    pairs = make_pairs(4, seed=1)
    model = ScalarModel(CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(1), tokens, jnp.broadcast_to(jnp.arange(8), (1, 8)), jnp.ones_like(tokens))
    params = params["params"]
    rc, rr = jax.jit(functools.partial(pair_rewards, apply_fn=apply_fn(model)))(
        params, packed_batch([pairs[:3], pairs[3:]])
    )
    apply = jax.jit(model.apply)
    for i, pair in enumerate(pairs):
        r, k = (0, i) if i < 3 else (1, i - 3)
        for j, (ids, _) in enumerate(pair):
            x = jnp.asarray(ids)[None]
            values = apply({"params": params}, x, jnp.arange(len(ids))[None], jnp.ones_like(x))
            want = float(values[0, len(ids) - 1])  # the response's last token ends the sequence here
            got = float((rc if j == 0 else rr)[r, k])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_last_target_index_skips_trailing_non_targets():
    # A template that writes a newline after the end-of-turn token: the reward is read at the
    # end-of-turn token (the last target), not at the newline.
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
    mask = jnp.asarray([[0, 1, 1, 0, 0, 1, 0, 0]])
    batch = {"segment_ids": seg, "loss_mask": mask, "pair_mask": jnp.ones((1, 1))}
    np.testing.assert_array_equal(last_target_index(batch), [[2, 5]])
    np.testing.assert_array_equal(values_at(jnp.arange(8.0)[None], last_target_index(batch)), [[2.0, 5.0]])


def test_reward_loss_closed_form():
    pairs = make_pairs(2, seed=2)
    model = ScalarModel(CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(2), tokens, jnp.broadcast_to(jnp.arange(8), (1, 8)), jnp.ones_like(tokens))
    params = params["params"]
    batch = packed_batch([pairs], scores=(1.5, -0.5))
    rc, rr = pair_rewards(params, batch, apply_fn=apply_fn(model))
    rc, rr = np.asarray(rc[0, :2], np.float64), np.asarray(rr[0, :2], np.float64)
    loss_sum, n, metrics = jax.jit(
        functools.partial(reward_loss, apply_fn=apply_fn(model), margin=0.3, score_weight=0.2, center_weight=0.05)
    )(params, batch, None)
    bt = np.log1p(np.exp(-(rc - rr - 0.3)))
    mse = (rc - 1.5) ** 2 + (rr + 0.5) ** 2
    want = np.sum(bt + 0.2 * mse + 0.05 * (rc + rr) ** 2)
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    assert float(n) == 2
    np.testing.assert_allclose(float(metrics["accuracy"][0]), np.sum(rc > rr))
    allr = np.concatenate([rc, rr])
    s, sq, c = (float(x) for x in metrics["reward_std"])
    np.testing.assert_allclose(np.sqrt(sq / c - (s / c) ** 2), allr.std(), rtol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_precomputed_reference_equals_in_step(params, loss_type):
    pairs = make_pairs(5, seed=3)
    batch = packed_batch([pairs[:3], pairs[3:]])
    if loss_type == "kto":
        batch["kto_label"] = jnp.asarray([[1, 0, 1], [0, 1, 0]], jnp.int32)
    model = Decoder(CFG)
    policy = jax.tree.map(lambda x: x * 1.01, params)  # a policy that moved away from the reference
    obj = Objective(loss_type=loss_type, beta=0.2, rpo_alpha=0.1)
    fn = jax.jit(functools.partial(preference_loss, apply_fn=apply_fn(model), objective=obj))
    a = fn(policy, batch, None, frozen=params)
    ref, _ = jax.jit(functools.partial(sequence_logps, apply_fn=apply_fn(model)))(params, batch)
    b = fn(policy, {**batch, "ref_logps": ref}, None)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert np.isfinite(float(a[0])) and float(a[1]) == 5


def test_dpo_loss_on_packed_batch_matches_the_formula(params):
    pairs = make_pairs(4, seed=4)
    batch = packed_batch([pairs[:2], pairs[2:]])
    model = Decoder(CFG)
    policy = jax.tree.map(lambda x: x * 0.98, params)
    loss_sum, _, metrics = preference_loss(
        policy, batch, None, apply_fn=apply_fn(model), objective=Objective(beta=0.5), frozen=params
    )
    pol, _ = sequence_logps(policy, batch, apply_fn=apply_fn(model))
    ref, _ = sequence_logps(params, batch, apply_fn=apply_fn(model))
    (pc, pr), (rc, rr) = split_pairs(pol), split_pairs(ref)
    sel = (slice(None), slice(0, 2))
    logits = (pc[sel] - pr[sel]) - (rc[sel] - rr[sel])
    want = np.sum(np.log1p(np.exp(-0.5 * np.asarray(logits, np.float64))))
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    margins = 0.5 * logits
    np.testing.assert_allclose(float(metrics["rewards/margins"][0]) / 4, float(margins.mean()), rtol=1e-5)
    losses, _, _ = formulas.dpo_loss(pc[sel], pr[sel], rc[sel], rr[sel], beta=0.5)
    np.testing.assert_allclose(float(loss_sum), float(losses.sum()), rtol=1e-6)


def test_dpo_step_moves_the_policy_and_never_the_reference(params):
    pairs = make_pairs(8, seed=5)
    batch = packed_batch([pairs[:3], pairs[3:6], pairs[6:], []])
    model = Decoder(CFG)
    optim = ml_collections.ConfigDict(
        dict(lr=1e-2, schedule="constant", warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.0, clip_norm=1.0)
    )  # fmt: skip
    tx, _ = make_optimizer(optim, 10)
    frozen = jax.tree.map(lambda x: x.copy(), params)
    before = jax.tree.map(np.asarray, frozen)
    state = TrainState.create(jax.tree.map(lambda x: x.copy(), params), tx, 0, frozen=frozen)
    loss_fn = functools.partial(preference_loss, apply_fn=apply_fn(model), objective=Objective(beta=0.1))
    step = make_train_step(loss_fn, tx, microbatches=2)
    margins = []
    for _ in range(5):
        state, m = step(state, batch)
        margins.append(float(m["rewards/margins"]))
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert margins[-1] > margins[0]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    after = jax.tree.leaves(state.params)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), after, strict=True))
    assert moved > 1e-4

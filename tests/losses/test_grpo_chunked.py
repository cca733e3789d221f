"""GRPO/PPO read the LM head in chunks (`config.train.loss_chunk`) with the same numbers as the full logits.

Every quantity the RL stages take from the logits is per position: the sampled tokens' log-probs, the
reference's top-k, the exact top-k KL, the entropy, the PTX term. So the chunked head must reproduce
each of them, and the loss gradients, while never building the [B, T, V] logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import align_jax as aj
from align_jax.batch import TOKEN_FIELDS
from align_jax.losses.grpo import PolicyObjective, grpo_loss, ppo_loss, reference_topk_of, score_samples
from align_jax.models.apply import apply_fn
from align_jax.models.heads import ScalarModel
from align_jax.models.transformer import Decoder
from tests.train.test_step import assert_trees_close, examples, rows

CFG = aj.ModelConfig(
    vocab_size=211, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)
CHUNK = 5  # 24 positions (the last predicts nothing) + 1 of padding: five strided chunks


def rollout_batch(seed: int = 0) -> dict[str, jax.Array]:
    """A packed rollout-shaped batch (two rows, padding at the end) with the fields the losses read."""
    b = rows([examples(3, seed=seed)[:2], examples(3, seed=seed)[2:]], seq_len=24)
    rng = np.random.default_rng(seed)
    shape = b["tokens"].shape
    b["old_logp"] = jnp.asarray(rng.normal(-3.0, 0.5, shape), jnp.float32)
    b["ref_logp"] = jnp.asarray(rng.normal(-3.0, 0.5, shape), jnp.float32)
    b["advantages"] = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
    b["old_values"] = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
    b["returns"] = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
    ptx = rows([examples(2, seed=seed + 9)], seq_len=24)
    b.update({f"ptx_{k}": v for k, v in ptx.items()})
    return b


@pytest.fixture(scope="module")
def model():
    cfg = CFG
    params = aj.init_params(cfg, jax.random.key(0))
    ref = aj.init_params(cfg, jax.random.key(1))
    return apply_fn(Decoder(cfg)), params, ref


@pytest.mark.parametrize("estimator", ["topk", "k3"])
def test_scoring_in_chunks_equals_full_logits(model, estimator):
    fn, params, ref = model
    batch = rollout_batch()
    score = functools.partial(score_samples, apply_fn=fn, estimator=estimator, topk=16)
    full = jax.jit(score)(params, ref, batch)
    chunked = jax.jit(functools.partial(score, loss_chunk=CHUNK))(params, ref, batch)
    for a, b in zip(full, chunked, strict=True):
        assert a.shape == (2, 23)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    if estimator == "topk":
        assert float(jnp.abs(full[2]).max()) > 1e-3  # two different models: the KL is not trivially 0

    topk = functools.partial(reference_topk_of, apply_fn=fn, topk=16)
    v_full, i_full = jax.jit(topk)(ref, batch)
    v_chunk, i_chunk = jax.jit(functools.partial(topk, loss_chunk=CHUNK))(ref, batch)
    np.testing.assert_allclose(v_chunk, v_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(i_chunk, i_full)


def ptx_reference(ref, batch, fn):
    values, indices = reference_topk_of(ref, {k: batch[f"ptx_{k}"] for k in TOKEN_FIELDS}, apply_fn=fn, topk=16)
    return {**batch, "ptx_ref_values": values, "ptx_ref_indices": indices}


@pytest.mark.parametrize(
    "settings",
    [
        dict(kl_mode="loss", kl_estimator="k3", ptx_coef=0.5, ptx_kind="kl"),
        dict(kl_mode="reward", ptx_coef=0.3, ptx_kind="nll", policy_loss="gspo"),
    ],
    ids=["kl-loss+ptx-kl", "gspo+ptx-nll"],
)
def test_grpo_loss_and_gradients_in_chunks_equal_full_logits(model, settings):
    fn, params, ref = model
    batch = ptx_reference(ref, rollout_batch(seed=3), fn)

    def run(chunk):
        objective = PolicyObjective(**settings, loss_chunk=chunk)
        loss = functools.partial(grpo_loss, apply_fn=fn, objective=objective)
        (loss_sum, (denom, metrics)), grads = jax.jit(
            jax.value_and_grad(lambda p: (lambda o: (o[0], (o[1], o[2])))(loss(p, batch, None)), has_aux=True)
        )(params)
        return loss_sum, denom, metrics, grads

    full, chunked = run(0), run(CHUNK)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
    assert float(chunked[1]) == float(full[1])
    assert set(chunked[2]) == set(full[2]) and "entropy" in full[2]
    for name in full[2]:
        np.testing.assert_allclose(np.asarray(chunked[2][name]), np.asarray(full[2][name]), rtol=1e-5, atol=1e-6)
    assert_trees_close(chunked[3], full[3], rtol=1e-4, atol=1e-6)


def test_ppo_loss_in_chunks_equals_full_logits(model):
    fn, params, _ = model
    value_model = ScalarModel(CFG)
    tokens = jnp.zeros((1, 4), jnp.int32)
    value_params = value_model.init(jax.random.key(4), tokens, tokens, tokens + 1)["params"]
    both = {"policy": params, "value": value_params}
    batch = rollout_batch(seed=5)

    def run(chunk):
        objective = PolicyObjective(loss_chunk=chunk)
        loss = functools.partial(ppo_loss, apply_fn=fn, value_fn=apply_fn(value_model), objective=objective)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, batch, None)[0]))(both)

    (l_full, g_full), (l_chunk, g_chunk) = run(0), run(CHUNK)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-5)
    assert_trees_close(g_chunk, g_full, rtol=1e-4, atol=1e-6)


def test_gemma_final_softcap_is_applied_in_chunks():
    cfg = CFG.replace(final_softcap=2.0)
    fn, params = apply_fn(Decoder(cfg)), aj.init_params(cfg, jax.random.key(0))
    batch = rollout_batch()
    score = functools.partial(score_samples, apply_fn=fn, estimator="k1", topk=1)
    full = jax.jit(score)(params, params, batch)
    chunked = jax.jit(functools.partial(score, loss_chunk=CHUNK))(params, params, batch)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5, atol=1e-6)


def test_chunked_update_never_builds_the_whole_logits():
    """The point of it: no [B, T-1, V] float32 buffer in the update's compiled temporaries."""
    cfg = CFG.replace(vocab_size=4096)
    fn, params = apply_fn(Decoder(cfg)), aj.init_params(cfg, jax.random.key(0))
    b = rows([examples(4, seed=s) for s in range(8)], seq_len=64)
    shape = b["tokens"].shape
    b.update({k: jnp.zeros(shape, jnp.float32) for k in ("old_logp", "advantages")})

    def temp_bytes(chunk):
        loss = functools.partial(grpo_loss, apply_fn=fn, objective=PolicyObjective(loss_chunk=chunk))
        grad = jax.jit(jax.grad(lambda p, x: loss(p, x, None)[0]))
        return grad.lower(params, b).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 8 * 63 * cfg.vocab_size * 4
    assert temp_bytes(0) - temp_bytes(16) >= logits_bytes

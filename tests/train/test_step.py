"""make_train_step: exact accumulation, packing and sharding invariance, non-finite guard."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import align_jax as aj
from align_jax.losses.sft import sft_loss, token_xent
from align_jax.models.apply import apply_fn
from align_jax.models.transformer import Decoder
from align_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from align_jax.train.state import TrainState
from align_jax.train.step import make_train_step

CFG = aj.ModelConfig(
    vocab_size=89, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)
OPTIM = ml_collections.ConfigDict(
    dict(
        lr=1e-2,
        schedule="cosine",
        warmup_steps=2,
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,
    )
)


def examples(n=6, seed=0):
    """(tokens, loss_mask) pairs of different lengths; the first 2 tokens of each are 'prompt'."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 12))
        toks = rng.integers(3, CFG.vocab_size, size=length).astype(np.int32)
        mask = np.ones(length, np.int32)
        mask[:2] = 0
        out.append((toks, mask))
    return out


def rows(groups, seq_len):
    """A batch where each row packs one group of examples."""
    b = {k: np.zeros((len(groups), seq_len), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    for r, group in enumerate(groups):
        at = 0
        for s, (toks, mask) in enumerate(group):
            n = len(toks)
            b["tokens"][r, at : at + n] = toks
            b["positions"][r, at : at + n] = np.arange(n)
            b["segment_ids"][r, at : at + n] = s + 1
            b["loss_mask"][r, at : at + n] = mask
            at += n
    return {k: jnp.asarray(v) for k, v in b.items()}


def new_state(optimizer, sharder=aj.Sharder()):
    params = aj.init_params(CFG, jax.random.key(0), sharder)
    return TrainState.create(params, optimizer, seed=0)


def one_step(batch, microbatches=1, sharder=aj.Sharder(), state_shardings=None):
    optimizer, _ = make_optimizer(OPTIM, total_steps=10)
    loss_fn = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(CFG, sharder)))
    step = make_train_step(loss_fn, optimizer, microbatches=microbatches, state_shardings=state_shardings, donate=False)
    state = new_state(optimizer, sharder)
    return step(state, batch)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_packed_equals_unpacked():
    ex = examples()
    unpacked = rows([[e] for e in ex], seq_len=12)
    packed = rows([ex[:3], ex[3:]], seq_len=40)
    s1, m1 = one_step(unpacked)
    s2, m2 = one_step(packed)
    assert float(m1["weight"]) == float(m2["weight"]) == sum(int(m[1:].sum()) for _, m in ex)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert_trees_close(s1.params, s2.params)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_equal_full_batch(microbatches):
    # Rows hold different numbers of target tokens, so a mean of microbatch means would differ.
    batch = rows([[e] for e in examples(8, seed=1)], seq_len=12)
    full_state, full = one_step(batch)
    acc_state, acc = one_step(batch, microbatches=microbatches)
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(acc["accuracy"], full["accuracy"], rtol=1e-6)
    assert_trees_close(acc_state.params, full_state.params)
    assert_trees_close(acc_state.opt_state, full_state.opt_state)


def test_sharded_step_equals_single_device():
    from align_jax.stages.build import setup_state

    batch = rows([[e] for e in examples(8, seed=2)], seq_len=12)
    ref_state, ref = one_step(batch)
    sharder = aj.Sharder(aj.make_mesh({"fsdp": 2, "tensor": 4}))
    cfg = ml_collections.ConfigDict(dict(optim=OPTIM, train=dict(steps=10), seed=0))
    setup = setup_state(CFG, sharder, cfg)
    assert setup.param_shardings["layers"]["stack"]["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    state, metrics = one_step(batch, sharder=sharder, state_shardings=setup.state_shardings)
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)
    assert_trees_close(jax.device_get(state.params), ref_state.params)
    mu = state.opt_state[1][0].mu["layers"]["stack"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # optimizer state sharded too


def test_non_finite_step_keeps_params():
    batch = rows([[e] for e in examples(2)], seq_len=12)
    optimizer, _ = make_optimizer(OPTIM, total_steps=10)

    def nan_loss(params, batch, rng):
        loss_sum, w, m = sft_loss(params, batch, rng, apply_fn=apply_fn(Decoder(CFG)))
        return loss_sum * jnp.nan, w, m

    state = new_state(optimizer)
    new, metrics = make_train_step(nan_loss, optimizer, donate=False)(state, batch)
    assert int(metrics["finite"]) == 0
    assert_trees_close(new.params, state.params, rtol=0, atol=0)
    assert int(new.step) == 1


def test_decay_mask_and_schedule():
    params = aj.init_params(CFG.replace(qkv_bias=True), jax.random.key(0))
    mask = decay_mask(params)
    assert mask["layers"]["stack"]["input_norm"]["scale"] is False
    assert mask["layers"]["stack"]["attn"]["q_proj"]["bias"] is False
    assert mask["layers"]["stack"]["attn"]["q_proj"]["kernel"] is True
    sched = learning_rate_schedule(OPTIM, total_steps=10)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(1e-2)
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-4)  # decays to lr * min_lr_ratio
    lin = learning_rate_schedule(ml_collections.ConfigDict({**OPTIM.to_dict(), "schedule": "linear"}), 10)
    assert float(lin(6)) == pytest.approx(1e-2 - 0.5 * 9e-3)
    # No weight decay reaches a norm scale: with zero gradient it stays exactly where it was.
    opt, _ = make_optimizer(ml_collections.ConfigDict({**OPTIM.to_dict(), "warmup_steps": 0}), total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert float(jnp.abs(updates["layers"]["stack"]["input_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["stack"]["mlp"]["up_proj"]["kernel"]).max()) > 0.0
    assert isinstance(opt, optax.GradientTransformation)


def test_sft_loss_closed_form_with_z_loss():
    """loss_sum = sum over targets of (logZ - logit[target]) + z * sum of logZ^2; weight = #targets."""
    batch = rows([[e] for e in examples(3, seed=5)], seq_len=12)
    params = aj.init_params(CFG, jax.random.key(1))
    loss_sum, weight, metrics = sft_loss(params, batch, None, apply_fn=apply_fn(Decoder(CFG)), z_loss=1e-3)
    logits = np.asarray(aj.forward(CFG, params, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
    tokens, lm, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
    nll = z = 0.0
    n = 0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if lm[b, t] and seg[b, t] and seg[b, t] == seg[b, t - 1]:
                row = logits[b, t - 1]
                logz = np.log(np.exp(row - row.max()).sum()) + row.max()
                nll += logz - row[tokens[b, t]]
                z += logz**2
                n += 1
    assert float(weight) == n
    np.testing.assert_allclose(float(loss_sum), nll + 1e-3 * z, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"][0]) / n, z / n, rtol=1e-5)


def test_fused_cross_entropy_equals_autodiff():
    """token_xent's hand-written backward (softmax - onehot, one pass) equals autodiff of the plain
    log-softmax, for cotangents on both the NLL and the log-partition (the z-loss path); `correct`
    equals argmax == target."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 7, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 7)), jnp.int32)
    w_nll, w_z = (jnp.asarray(rng.standard_normal((3, 7)), jnp.float32) for _ in range(2))

    def plain(x):
        logz = jax.nn.logsumexp(x, axis=-1)
        nll = logz - jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * w_nll + jnp.square(logz) * w_z)

    def fused(x):
        nll, logz, _ = token_xent(x, targets)
        return jnp.sum(nll * w_nll + jnp.square(logz) * w_z)

    np.testing.assert_allclose(fused(logits), plain(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fused)(logits), jax.grad(plain)(logits), rtol=1e-5, atol=1e-6)
    correct = token_xent(logits, targets)[2]
    np.testing.assert_array_equal(correct, (jnp.argmax(logits, -1) == targets).astype(jnp.float32))
    # bf16 logits: the loss is computed in float32 and the gradient comes back in bf16.
    g16 = jax.grad(lambda x: token_xent(x, targets)[0].sum())(logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16


def test_bf16_compute_keeps_fp32_master_weights():
    cfg = CFG.replace(dtype="bfloat16")
    batch = rows([[e] for e in examples(4, seed=6)], seq_len=12)
    optimizer, _ = make_optimizer(OPTIM, total_steps=10)
    state = TrainState.create(aj.init_params(cfg, jax.random.key(0)), optimizer, seed=0)
    step = make_train_step(functools.partial(sft_loss, apply_fn=apply_fn(Decoder(cfg))), optimizer, donate=False)
    new, metrics = step(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    _, ref = one_step(batch)  # the same step in fp32
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=2e-2)  # bf16 rounding only


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_full_and_saves_memory(tied):
    cfg = CFG.replace(tie_word_embeddings=tied, vocab_size=2048)
    batch = rows([[e] for e in examples(4, seed=7)], seq_len=12)
    params = aj.init_params(cfg, jax.random.key(2))

    def run(chunk):
        fn = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(cfg)), z_loss=1e-3, loss_chunk=chunk)
        (loss_sum, (w, m)), g = jax.value_and_grad(
            lambda p: (lambda o: (o[0], (o[1], o[2])))(fn(p, batch, None)), has_aux=True
        )(params)
        return loss_sum, w, m, g

    full, chunked = run(0), run(4)  # 11 predicted positions: chunks of 4, the last one padded
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-6)
    assert float(chunked[1]) == float(full[1])
    np.testing.assert_allclose(chunked[2]["accuracy"][0], full[2]["accuracy"][0])
    assert_trees_close(chunked[3], full[3], rtol=1e-4, atol=1e-6)  # fp32 summation order (head grad per chunk)

    # The point of it: compiled temporaries shrink with the [B, T, V] logits gone.
    big = rows([[e] for e in examples(8, seed=8)], seq_len=256)

    def temp_bytes(chunk):
        fn = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(cfg)), loss_chunk=chunk)
        grad = jax.jit(jax.grad(lambda p, b: fn(p, b, None)[0]))
        return grad.lower(params, big).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 8 * 255 * cfg.vocab_size * 4  # one float32 [B, T-1, V] buffer
    assert temp_bytes(0) - temp_bytes(32) >= logits_bytes


def test_eval_step_is_the_loss_of_the_state_with_its_frozen_reference():
    """make_eval_step gives the loss function's sums for the state's params, passes the frozen
    reference when the state carries one, and leaves the state as it was (nothing donated)."""
    from align_jax.train.step import make_eval_step

    optimizer, _ = make_optimizer(OPTIM, total_steps=10)
    batch = rows([examples()[:3], examples()[3:]], 32)
    loss_fn = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(CFG)))
    state = new_state(optimizer)
    got = make_eval_step(loss_fn)(state, batch)
    want = loss_fn(state.params, batch, None)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1])
    assert set(got[2]) == set(want[2])

    seen = []

    def with_reference(params, batch, rng, *, frozen=None):
        seen.append(frozen is not None)
        return loss_fn(params, batch, rng)

    frozen_state = state.replace(frozen=jax.tree.map(jnp.copy, state.params))
    make_eval_step(with_reference)(frozen_state, batch)
    assert seen == [True] and np.isfinite(float(jax.tree.leaves(frozen_state.params)[0].sum()))

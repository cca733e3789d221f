"""Ulysses sequence parallelism (align_jax/models/sequence_parallel.py) = the unsplit computation.

On the 8 fake CPU devices: the length split 4 ways (with data, fsdp or tensor beside it) gives the same
attention, SFT loss and parameter gradients, RM loss and DPO loss as one device, on packed rows (several
segments and padding per row), for grouped-query attention (kv heads repeated), a sliding window and
Gemma-style alternating layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import align_jax as aj
from align_jax.losses.dpo import Objective, preference_loss
from align_jax.losses.reward import reward_loss
from align_jax.losses.sft import sft_loss
from align_jax.models.apply import apply_fn
from align_jax.models.attention import attention, make_mask
from align_jax.models.heads import ScalarModel
from align_jax.models.sequence_parallel import kv_repeats, sequence_axes, ulysses_attention
from align_jax.models.transformer import Decoder
from align_jax.sharding import ShardingError, make_mesh
from tests.losses.test_packed_pairs import make_pairs, packed_batch

T = 128  # >= 128: the reference attention runs its blocked causal path, as long rows do
GQA = aj.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)
WINDOW = GQA.replace(model_type="mistral", sliding_window=24)
# Gemma-style alternating layers: the layer's flag picks its window inside the shard_map.
MIXED = GQA.replace(layer_types=("sliding_attention", "full_attention"), sliding_window=16)
WIDE = GQA.replace(hidden_size=64, num_heads=8, num_kv_heads=2)  # 8 heads: sequence 4 x tensor 2

SEQ_DATA = {"data": 2, "sequence": 4}
SEQ_FSDP = {"fsdp": 2, "sequence": 4}
SEQ_TENSOR = {"tensor": 2, "sequence": 4}


def mesh_id(shape: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in shape.items())


def packed_rows(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    """Rows of several segments (lengths 5..40, positions restarting at 0) and trailing padding, with a
    loss mask that leaves each segment's first tokens (a 'prompt') out."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, length), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    for r in range(batch):
        pos, seg = 0, 1
        while True:
            n = int(rng.integers(5, 41))
            if pos + n > length - 3:  # at least 3 padding tokens end every row
                break
            out["tokens"][r, pos : pos + n] = rng.integers(1, vocab, size=n)
            out["positions"][r, pos : pos + n] = np.arange(n)
            out["segment_ids"][r, pos : pos + n] = seg
            out["loss_mask"][r, pos + int(rng.integers(1, 4)) : pos + n] = 1
            pos, seg = pos + n, seg + 1
    return {k: jnp.asarray(v) for k, v in out.items()}


def put(batch: dict[str, jax.Array], sharder: aj.Sharder) -> dict[str, jax.Array]:
    """The [B, T] fields placed as the data pipeline places them: batch over the data axes, length over
    `sequence`; the per-pair fields over the batch axes only."""
    length = batch["tokens"].shape[1]
    spec = {True: P(("data", "fsdp"), "sequence"), False: P(("data", "fsdp"))}
    return {k: jax.device_put(x, NamedSharding(sharder.mesh, spec[x.shape[1] == length])) for k, x in batch.items()}


def max_err(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


# -- attention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "b", "heads", "kv_heads", "window"),
    [
        (SEQ_DATA, 4, 4, 2, None),
        (SEQ_DATA, 4, 4, 4, 20),
        (SEQ_TENSOR, 4, 8, 2, None),
        (SEQ_TENSOR, 4, 8, 1, 20),
        ({"expert": 2, "sequence": 4}, 1, 4, 2, None),  # one row: replicated over `expert`
    ],
    ids=["gqa", "mha-window", "tensor-gqa", "tensor-mqa-window", "replicated-axis"],
)
def test_ulysses_attention_and_its_grads_equal_reference(shape, b, heads, kv_heads, window):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, T, heads, 8), jnp.float32)
    k = jax.random.normal(keys[1], (b, T, kv_heads, 8), jnp.float32)
    v = jax.random.normal(keys[2], (b, T, kv_heads, 8), jnp.float32)
    seg = packed_rows(b, T, 64)["segment_ids"]
    # Padding rows attend among themselves: their outputs are not compared (weight 0).
    w = jax.random.normal(keys[3], q.shape) * (seg > 0)[:, :, None, None]
    index = jnp.broadcast_to(jnp.arange(T)[None], (b, T))
    mask = make_mask(seg, seg, index, index, window)

    def want_fn(q, k, v):
        return attention(q, k, v, mask, impl="reference", aligned=True, sliding_window=window, scale=0.3) * w

    sharder = aj.Sharder(make_mesh(shape))
    ulysses = functools.partial(ulysses_attention, sharder=sharder, impl="reference", sliding_window=window, scale=0.3)

    def got_fn(q, k, v):
        return ulysses(q, k, v, seg) * w

    def output_and_grads(fn):  # the gradients of the weighted sum of the outputs
        out, pullback = jax.vjp(jax.jit(fn), q, k, v)
        return (out, *pullback(jnp.ones_like(out)))

    for x, y in zip(output_and_grads(got_fn), output_and_grads(want_fn), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-6)


def test_kv_repeats_and_head_divisibility():
    assert kv_repeats(32, 8, 8) == 1  # Llama-3-8B on sequence 8: kv heads already split
    assert kv_repeats(32, 8, 16) == 2
    assert kv_repeats(4, 2, 4) == 2
    assert kv_repeats(8, 1, 8) == 8
    with pytest.raises(ShardingError, match=r"num_heads=6 is not divisible by 4"):
        kv_repeats(6, 2, 4)


def test_heads_that_do_not_split_fail_with_a_clear_message():
    sharder = aj.Sharder(make_mesh({"data": 2, "sequence": 4}))
    cfg = GQA.replace(hidden_size=48, num_heads=6, num_kv_heads=2)
    with pytest.raises(ShardingError, match=r"num_heads=6 is not divisible by 4"):
        jax.eval_shape(lambda: aj.init_params(cfg, jax.random.key(0), sharder))


def test_a_length_the_axis_does_not_divide_runs_unsplit():
    """T = 12 on sequence = 8: the rules leave the length whole, and attention runs as without the split."""
    sharder = aj.Sharder(make_mesh({"sequence": 8}))
    params = aj.init_params(GQA, jax.random.key(0))
    batch = packed_rows(2, 12, GQA.vocab_size)
    assert sequence_axes(sharder, (2, 12)) == () and sequence_axes(sharder, (2, 16)) == ("sequence",)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    want = aj.forward(GQA, params, *args)
    got = aj.forward(GQA, params, *args, sharder=sharder)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# -- through the model: SFT loss and gradients ---------------------------------------------------------


def sft_objective(cfg: aj.ModelConfig, sharder: aj.Sharder, loss_chunk: int):
    loss = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(cfg, sharder)), loss_chunk=loss_chunk)

    def mean_loss(params, batch):
        loss_sum, n, _ = loss(params, batch, None)
        return loss_sum / n

    return jax.value_and_grad(mean_loss)


@functools.cache
def unsplit(cfg: aj.ModelConfig, loss_chunk: int):
    params = aj.init_params(cfg, jax.random.key(0))
    batch = packed_rows(4, T, cfg.vocab_size, seed=1)
    value, grads = jax.jit(sft_objective(cfg, aj.Sharder(), loss_chunk))(params, batch)
    return jax.device_get(params), batch, (value, grads)


CASES = [
    (GQA, SEQ_DATA, 0),
    (GQA, SEQ_FSDP, 32),  # loss chunks under the split length
    (WINDOW, SEQ_DATA, 0),
    (MIXED, SEQ_FSDP, 0),
    (WIDE, SEQ_TENSOR, 0),
]


@pytest.mark.parametrize(
    ("cfg", "shape", "loss_chunk"),
    CASES,
    ids=["gqa-" + mesh_id(SEQ_DATA), "gqa-chunked-" + mesh_id(SEQ_FSDP), "window", "mixed", "tensor"],
)
def test_sft_loss_and_grads_equal_unsplit(cfg, shape, loss_chunk):
    host_params, batch, (want_loss, want_grads) = unsplit(cfg, loss_chunk)
    sharder = aj.Sharder(make_mesh(shape))
    assert sequence_axes(sharder, (4, T)) == ("sequence",)
    params = aj.init_params(cfg, jax.random.key(0), sharder)  # the same values, now sharded
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), host_params)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    step = jax.jit(sft_objective(cfg, sharder, loss_chunk), out_shardings=(None, shardings))
    loss, grads = step(params, put(batch, sharder))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-6)
    got, want = jax.tree.leaves(jax.device_get(grads)), jax.tree.leaves(want_grads)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    # The measured gaps, for the docs: |loss - loss_1| and max |grad - grad_1| over every parameter.
    print(
        f"loss {float(want_loss):.4f}, err {abs(float(loss) - float(want_loss)):.2e}, grad err {max_err(got, want):.2e}"
    )


def test_the_split_runs_through_all_to_alls():
    """The shard_map path is taken: its all-to-alls are in the program, and no [B, T, T] mask is built."""
    cfg = GQA
    sharder = aj.Sharder(make_mesh(SEQ_DATA))
    params = jax.eval_shape(lambda: aj.init_params(cfg, jax.random.key(0)))
    batch = packed_rows(4, T, cfg.vocab_size)
    text = jax.jit(sft_objective(cfg, sharder, 0)).lower(params, batch).as_text()
    assert "all_to_all" in text
    assert f"4x{T}x{T}xi1" not in text  # the dense mask exists only per head shard, inside the shard_map
    plain = jax.jit(sft_objective(cfg, aj.Sharder(make_mesh({"data": 8})), 0)).lower(params, batch).as_text()
    assert "all_to_all" not in plain and f"4x{T}x{T}xi1" in plain


# -- RM and DPO losses ---------------------------------------------------------------------------------


def preference_batch() -> dict[str, jax.Array]:
    pairs = make_pairs(8, seed=7)  # packed_batch rows are 64 tokens, 3 pairs at most
    return packed_batch([pairs[:3], pairs[3:5], pairs[5:8], []])


def test_reward_loss_equals_unsplit():
    cfg = GQA.replace(vocab_size=61)
    batch = preference_batch()

    def run(sharder):
        model = ScalarModel(cfg, sharder)
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = jax.jit(lambda key: model.init(key, tokens, tokens, tokens + 1)["params"])(jax.random.key(3))
        fn = jax.jit(functools.partial(reward_loss, apply_fn=apply_fn(model), margin=0.1, score_weight=0.0))
        return fn(params, batch if sharder.mesh is None else put(batch, sharder), None)

    (want, n_want, _), (got, n_got, _) = run(aj.Sharder()), run(aj.Sharder(make_mesh(SEQ_DATA)))
    assert float(n_got) == float(n_want) == 8
    np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
    print(f"RM loss {float(want):.6f}, err {abs(float(got) - float(want)):.2e}")


def test_dpo_loss_equals_unsplit():
    cfg = GQA.replace(vocab_size=61)
    batch = preference_batch()
    params = aj.init_params(cfg, jax.random.key(4))
    policy = jax.tree.map(lambda x: x * 1.02, params)  # a policy that moved away from the reference

    def run(sharder):
        fn = functools.partial(
            preference_loss, apply_fn=apply_fn(Decoder(cfg, sharder)), objective=Objective(beta=0.3), loss_chunk=16
        )
        b = batch if sharder.mesh is None else put(batch, sharder)
        return jax.jit(fn)(policy, b, None, frozen=params)

    (want, n_want, _), (got, n_got, _) = run(aj.Sharder()), run(aj.Sharder(make_mesh(SEQ_FSDP)))
    assert float(n_got) == float(n_want) == 8
    np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
    print(f"DPO loss {float(want):.6f}, err {abs(float(got) - float(want)):.2e}")

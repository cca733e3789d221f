"""LoRA and QLoRA below the stages (align_jax/lora): trees by path, the adapter-aware forward, the config
section, the frozen base's storage and sharding, and one train step sharded = single device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import ConfigValueError, base_config, validate
from align_jax.config.sections import lora_fields, lora_targets
from align_jax.lora import tree
from align_jax.lora.apply import adapter_loss, dropout_scope, model_apply_fn
from align_jax.lora.plan import LoraPlan
from align_jax.losses.sft import sft_loss
from align_jax.models.config import LORA_TARGETS, ModelConfig
from align_jax.models.hf import abstract_params
from align_jax.models.nf4 import NF4
from align_jax.models.transformer import Decoder, default_positions, init_params
from align_jax.sharding import Sharder, make_mesh
from align_jax.stages import build
from align_jax.stages.spec import ParamsInit
from align_jax.train.step import make_train_step

BASE = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)
LORA = BASE.replace(lora_rank=4, lora_alpha=8.0)


def batch(rows=8, length=16, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(3, 64, size=(rows, length)), jnp.int32)
    return {
        "tokens": tokens,
        "positions": default_positions(tokens),
        "segment_ids": jnp.ones_like(tokens),
        "loss_mask": jnp.ones_like(tokens),
    }


@pytest.fixture(scope="module")
def lora_params():
    return init_params(LORA, jax.random.key(0))


def perturbed(params, seed=1, scale=0.2):
    """Non-zero B (a fresh adapter's is zero, which would hide every mistake in how it is applied)."""
    flat = tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, path in zip(keys, sorted(flat), strict=True):
        if path[-1] == "lora_b":
            flat[path] = scale * jax.random.normal(key, flat[path].shape, flat[path].dtype)
    return tree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, b):
    return model_apply_fn(Decoder(cfg))(params, b["tokens"], b["positions"], b["segment_ids"])


def test_split_and_merge_by_path(lora_params):
    params = lora_params
    trainable, base = tree.split(params)
    assert all(tree.is_adapter(p) for p in tree.flatten(trainable))
    assert not any(tree.is_adapter(p) for p in tree.flatten(base))
    # The base is exactly a decoder without LoRA: same paths, same shapes.
    plain = jax.eval_shape(lambda: init_params(BASE, jax.random.key(0)))
    assert jax.tree.map(jnp.shape, base) == jax.tree.map(jnp.shape, plain)
    assert ("layers", "stack", "attn", "o_proj", "lora_a") in tree.flatten(trainable)
    assert trainable["layers"]["stack"]["attn"]["o_proj"]["lora_a"].shape == (2, 4, 8, 4)  # [L, N, H, r]
    assert trainable["layers"]["stack"]["attn"]["q_proj"]["lora_b"].shape == (2, 4, 4, 8)  # [L, r, N, H]
    jax.tree.map(np.testing.assert_array_equal, tree.merge(trainable, base), params)
    # A stage whose decoder is one part of its params (the RM): what lies outside the part trains too.
    rm = {"decoder": params, "head": {"kernel": jnp.ones(32), "bias": jnp.zeros(())}}
    trainable, base = tree.split(rm, "decoder")
    assert set(trainable) == {"decoder", "head"} and "head" not in base and "embed" in base
    jax.tree.map(np.testing.assert_array_equal, tree.merge(trainable, base, "decoder"), rm)


def test_zero_b_is_the_base_model_and_the_base_tree_runs_adapters_off(lora_params):
    params = lora_params
    _, base = tree.split(params)
    b = batch()
    with_adapters = logits(LORA, params, b)
    # B = 0 at step 0: the adapted model IS the base, to the bit.
    np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(logits(BASE, base, b)))
    # The adapter-aware apply runs a tree without adapters as the base model (DPO/GRPO's reference).
    np.testing.assert_array_equal(np.asarray(logits(LORA, base, b)), np.asarray(logits(BASE, base, b)))
    # Non-zero adapters change the output, and equal the base with W + (alpha / r) A B merged in.
    moved = perturbed(params)
    out = logits(LORA, moved, b)
    assert float(jnp.abs(out - with_adapters).max()) > 1e-2
    trainable, base = tree.split(moved)
    merged = tree.merged_weights(trainable, base, scale=LORA.lora_alpha / LORA.lora_rank, dtype="float32")
    np.testing.assert_allclose(np.asarray(logits(BASE, merged, b)), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_dropout_only_inside_a_train_loss():
    cfg = LORA.replace(lora_dropout=0.5)
    params, b = perturbed(init_params(cfg, jax.random.key(0))), batch()
    loss_fn = functools.partial(sft_loss, apply_fn=model_apply_fn(Decoder(cfg)), z_loss=0.0, loss_chunk=0)
    trainable, base = tree.split(params)
    train = jax.jit(adapter_loss(loss_fn, part=None, reference=False, dropout=True))
    evaluate = jax.jit(adapter_loss(loss_fn, part=None, reference=False, dropout=False))
    rng = jax.random.key(0)
    plain = float(jax.jit(loss_fn)(params, b, rng)[0])  # no scope: no dropout
    assert float(evaluate(trainable, b, rng, frozen=base)[0]) == plain
    dropped = float(train(trainable, b, rng, frozen=base)[0])
    assert dropped != plain and float(train(trainable, b, jax.random.key(1), frozen=base)[0]) != dropped

    def scoped(p, b, key):
        with dropout_scope(key):
            return logits.__wrapped__(cfg, p, b)

    assert float(jnp.abs(jax.jit(scoped)(params, b, jax.random.key(3)) - logits(cfg, params, b)).max()) > 1e-3


def test_qlora_forward_is_the_dequantised_base(lora_params):
    params = perturbed(lora_params)
    trainable, base = tree.split(params)
    frozen = tree.frozen_base(base, quantize="nf4", block_size=16, param_dtype="float32", compute_dtype="float32")
    kernels = [p for p, x in tree.flatten(frozen).items() if isinstance(x, NF4)]
    # Every projection kernel of the stack, adapted or not; embeddings, norms (and an LM head) stay.
    assert len(kernels) == len(LORA_TARGETS) and all(p[-1] == "kernel" for p in kernels)
    assert isinstance(tree.flatten(frozen)[("embed", "embedding")], jax.Array)
    assert tree.nbytes(frozen) < 0.6 * tree.nbytes(base)
    b = batch()
    ours = logits(LORA, tree.merge(trainable, frozen), b)  # dequantised layer by layer, inside the scan
    dense = tree.merge(trainable, tree.dequantized(frozen, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(logits(LORA, dense, b)), rtol=1e-6, atol=1e-6)
    # Multi-layer remat units reshape the stacked leaves [L, ...] -> [L/k, k, ...]: NF4 leaves go along.
    units = LORA.replace(layers_per_unit=2, remat_policy="full")
    np.testing.assert_allclose(
        np.asarray(logits(units, tree.merge(trainable, frozen), b)), np.asarray(ours), rtol=1e-6, atol=1e-6
    )


def test_config_section_values_and_errors():
    c = base_config("sft")
    c.data.train = "demo:sft_train"
    assert c.lora.rank == 0 and lora_fields(c) == {}
    c.lora.rank, c.lora.targets = 8, "v_proj, q_proj"
    validate(c)
    assert lora_fields(c) == dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets=("q_proj", "v_proj"))
    assert lora_targets(("q_proj,k_proj",)) == ("q_proj", "k_proj")  # absl's form of --config.lora.targets=a,b
    assert lora_targets("all") == LORA_TARGETS and lora_targets(("down_proj", "up_proj")) == ("up_proj", "down_proj")
    bad = [
        ("targets", "q_proj,qkv", r"lora\.targets=.*unknown: \['qkv'\]"),
        ("targets", "", r"lora\.targets"),
        ("rank", -1, r"lora\.rank=-1"),
        ("alpha", 0.0, r"lora\.alpha=0\.0 must be positive"),
        ("dropout", 1.0, r"lora\.dropout=1\.0"),
        ("quantize", "int8", r"lora\.quantize='int8' is not one of"),
        ("block_size", 63, r"lora\.block_size=63 must be even"),
    ]
    for key, value, message in bad:
        c2 = base_config("sft")
        c2.data.train, c2.lora.rank = "demo:sft_train", 4
        c2.lora[key] = value
        with pytest.raises(ConfigValueError, match=message):
            validate(c2)
    c3 = base_config("dpo")
    c3.data.train, c3.lora.quantize = "demo:pref_train", "nf4"
    with pytest.raises(ConfigValueError, match=r"set config\.lora\.rank > 0"):
        validate(c3)


def sharded_steps(mesh_shape, quantize, steps=2):
    """Two SFT train steps of a LoRA (or QLoRA) model through the driver's own pieces (LoraPlan,
    setup_state, make_train_step), on `mesh_shape` over the 8 test devices or on one device."""
    devices = jax.devices() if mesh_shape else jax.devices()[:1]
    sharder = Sharder(make_mesh(mesh_shape or {"data": 1}, devices))
    c = base_config("sft")
    c.data.train = "demo:sft_train"
    c.lora.update(rank=4, alpha=8.0, quantize=quantize, block_size=16)
    c.optim.update(lr=1e-2, warmup_steps=0)
    cfg = LORA
    params = ParamsInit(
        boxed_abstract=abstract_params(cfg, sharder),
        fresh=lambda rng: init_params(cfg, rng),
    )
    plan = LoraPlan(params, cfg, sharder, c)
    setup = build.setup_state(cfg, sharder, c, boxed_abstract=plan.boxed_trainable)
    shardings = setup.state_shardings.replace(frozen=plan.frozen_shardings)
    base = jax.device_put(tree.split(init_params(cfg, jax.random.key(0)))[1], plan.base_shardings)
    state = jax.jit(setup.make_state, out_shardings=setup.state_shardings)(plan.trainable_from_base(base))
    state = state.replace(frozen=plan.freeze(base))
    loss_fn = functools.partial(sft_loss, apply_fn=model_apply_fn(Decoder(cfg, sharder)), z_loss=0.0, loss_chunk=0)
    b = batch()
    batch_shardings = setup.batch_shardings(tuple(b))
    step = make_train_step(
        plan.loss(loss_fn, train=True), setup.optimizer, state_shardings=shardings, batch_shardings=batch_shardings
    )
    losses = []
    for _ in range(steps):
        state, metrics = step(state, jax.device_put(b, batch_shardings))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.mark.parametrize(
    ("quantize", "shape"), [("none", {"fsdp": 2, "tensor": 2, "data": 2}), ("nf4", {"data": 2, "tensor": 4})]
)
def test_lora_step_sharded_equals_single_device(quantize, shape):
    losses, adapters, _ = sharded_steps(None, quantize)
    got, got_adapters, state = sharded_steps(shape, quantize)
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_adapters, adapters)
    assert losses[1] < losses[0]
    # The frozen base really is sharded like the params (NF4 codes and scales like their kernel).
    q = state.frozen["layers"]["stack"]["mlp"]["gate_proj"]["kernel"]
    if quantize == "nf4":
        assert isinstance(q, NF4) and q.codes.sharding.spec[2] == "tensor"  # [L, E, F] -> codes [L, E, F/2]
    else:
        assert q.sharding.spec[2] == "tensor"
    # Only adapters have optimizer state: every moment is adapter-shaped.
    shapes = {x.shape for x in jax.tree.leaves(state.params)}
    assert all(x.ndim == 0 or x.shape in shapes for x in jax.tree.leaves(state.opt_state))


def test_memory_of_an_8b_lora_state_from_shapes():
    """launch/lora_memory.py's figures for Llama-3-8B at rank 16 (nothing allocated): PEFT's count of
    trainable parameters for all seven projections (41,943,040), Adam moments for those alone, and a
    frozen base in bf16 (LoRA) or NF4 projections + bf16 embeddings (QLoRA)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    from lora_memory import preset_config, state_sizes

    sizes = {}
    for name, rank, quantize in (("full", 0, "none"), ("lora", 16, "none"), ("qlora", 16, "nf4")):
        sizes[name] = state_sizes(*preset_config("llama3_8b", rank, quantize, 256, 1))
    assert sizes["lora"]["params_bytes"] == sizes["qlora"]["params_bytes"] == 41_943_040 * 4
    assert sizes["lora"]["opt_state_bytes"] < 2 * sizes["lora"]["params_bytes"] + 1024
    full_params = sizes["full"]["params_bytes"]
    assert full_params == 8_030_261_248 * 4 and sizes["full"]["frozen_bytes"] == 0
    norms = 4096 * 65  # 2 per layer + the final one: kept in float32
    assert sizes["lora"]["frozen_bytes"] == full_params // 2 + 2 * norms  # kernels, embeddings in bf16 (compute)
    embeddings = 2 * 128256 * 4096 * 2  # embed + lm_head in bf16
    projections = (8_030_261_248 - 2 * 128256 * 4096 - norms) * 0.5625  # 4.5 bits each
    assert sizes["qlora"]["frozen_bytes"] == embeddings + projections + 4 * norms

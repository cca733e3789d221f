"""Meshes, rules, and sharded = single-device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import align_jax as aj
from align_jax.models.transformer import Decoder, default_positions
from align_jax.sharding import DEFAULT_RULES, ShardingError, logical_to_spec, make_mesh, normalize_rules

CFG = aj.ModelConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, dtype="float32"
)
MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"fsdp": 2, "tensor": 4},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 2, "sequence": 4},
]


def loss(cfg, sharder, params, tokens):
    logits = Decoder(cfg, sharder).apply({"params": params}, tokens, default_positions(tokens), jnp.ones_like(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits


@pytest.fixture(scope="module")
def single_device():
    params = aj.init_params(CFG, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(8, 32)), jnp.int32)
    (loss_value, logits), g = jax.jit(jax.value_and_grad(lambda p: loss(CFG, aj.Sharder(), p, tokens), has_aux=True))(
        params
    )
    return jax.device_get(params), np.asarray(tokens), (loss_value, logits, g)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_forward_and_grad_equal_single_device(single_device, shape):
    host_params, tokens, (l0, logits0, g0) = single_device
    sharder = aj.Sharder(make_mesh(shape))
    params = aj.init_params(CFG, jax.random.key(0), sharder)  # same rng: the same values, now sharded
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), host_params)
    batch = jax.device_put(tokens, jax.sharding.NamedSharding(sharder.mesh, P(("data", "fsdp"), "sequence")))
    # As the train step does: gradients pinned to the params' shardings.
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    step = jax.jit(
        jax.value_and_grad(lambda p, t: loss(CFG, sharder, p, t), has_aux=True),
        out_shardings=((None, None), param_shardings),
    )
    (loss_value, logits), g = step(params, batch)
    np.testing.assert_allclose(loss_value, l0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits0), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jax.device_get(g), g0)


def test_params_are_really_sharded():
    sharder = aj.Sharder(make_mesh({"fsdp": 2, "tensor": 4}))
    params = aj.init_params(CFG, jax.random.key(0), sharder)
    layers = params["layers"]["stack"]
    assert layers["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)  # [L, E, N, H]
    assert layers["attn"]["o_proj"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")  # [L, N, H, E]
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")  # [V, E]
    assert layers["attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape == (2, 32, 2, 8)


def test_spec_resolution_is_shape_aware():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    rules = DEFAULT_RULES
    # 2 KV heads cannot split 4 ways: replicated on that dim instead of an error.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 8), mesh, rules) == P("fsdp", None, None)
    # A mesh axis is used once per array.
    assert logical_to_spec(("heads", "mlp"), (8, 8), mesh, rules) == P("tensor", None)
    # Batch over (data, fsdp): keeps the axes that divide.
    mesh2 = make_mesh({"data": 2, "fsdp": 4})
    assert logical_to_spec(("activation_batch",), (2,), mesh2, rules) == P("data")
    assert logical_to_spec(("activation_batch",), (8,), mesh2, rules) == P(("data", "fsdp"))


def test_mesh_and_rule_errors():
    shape = dict(make_mesh({"fsdp": -1, "tensor": 2}).shape)
    assert shape == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1, "expert": 1}
    assert make_mesh(None).shape["data"] == 8
    with pytest.raises(ShardingError, match="needs 6 devices, but there are 8"):
        make_mesh({"data": 2, "tensor": 3})
    with pytest.raises(ShardingError, match="unknown axes"):
        make_mesh({"model": 8})
    with pytest.raises(ShardingError, match="more than one rule"):
        normalize_rules([("embed", "fsdp"), ("embed", None)])
    with pytest.raises(ShardingError, match="names mesh axis 'model'"):
        normalize_rules({"embed": "model"})
    assert normalize_rules({"embed": ["data", "fsdp"]}) == (("embed", ("data", "fsdp")),)

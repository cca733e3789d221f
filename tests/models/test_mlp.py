"""The MLP's fused gate/up einsum (training, prefill) equals the two separate projections (decode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import align_jax as aj
from align_jax.models.transformer import Mlp
from align_jax.sharding import Sharder


@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_equals_separate_projections(bias):
    cfg = aj.ModelConfig(
        vocab_size=31, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, mlp_bias=bias, dtype="float32"
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)), jnp.float32)
    fused, separate = Mlp(cfg, Sharder(), fuse_gate_up=True), Mlp(cfg, Sharder(), fuse_gate_up=False)
    params = fused.init(jax.random.key(0), x)["params"]
    # Same leaves (HF's gate_proj / up_proj / down_proj), so either form reads any checkpoint.
    other = separate.init(jax.random.key(0), x)["params"]
    assert traverse_util.flatten_dict(params).keys() == traverse_util.flatten_dict(other).keys()
    assert (("gate_proj", "bias") in traverse_util.flatten_dict(params)) == bias
    if bias:  # non-zero biases, so adding them in the wrong slot would show
        params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))

    (l_f, g_f), (l_s, g_s) = (jax.value_and_grad(loss(m), argnums=(0, 1))(params, x) for m in (fused, separate))
    np.testing.assert_allclose(l_f, l_s, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

"""The scalar head sits on the decoder's final hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import align_jax as aj
from align_jax.models.heads import ScalarModel
from align_jax.models.transformer import default_positions

CFG = aj.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, dtype="float32")


def test_scalar_model_reads_final_hidden_states():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(3, 10)), jnp.int32)
    model = ScalarModel(CFG)
    variables = model.init(jax.random.key(0), tokens, default_positions(tokens), jnp.ones_like(tokens))
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {"decoder", "head"}
    # A causal LM's params, less its unused LM head, slot into 'decoder' (the RM stage's init).
    lm = aj.init_params(CFG, jax.random.key(1))
    lm.pop("lm_head")
    assert jax.tree.structure(lm) == jax.tree.structure(params["decoder"])
    params = {**params, "decoder": lm}
    values = model.apply({"params": params}, tokens, default_positions(tokens), jnp.ones_like(tokens))
    assert values.shape == (3, 10) and values.dtype == jnp.float32
    hidden = aj.forward(CFG, lm, tokens, return_hidden=True)
    head = params["head"]
    np.testing.assert_allclose(values, hidden @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)
    # Gradients reach both the head and the decoder.
    grads = jax.grad(
        lambda p: model.apply({"params": p}, tokens, default_positions(tokens), jnp.ones_like(tokens)).sum()
    )(params)
    assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["decoder"]["embed"]["embedding"]).sum()) > 0

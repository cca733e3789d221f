"""One mixture-of-experts layer against a dense SwiGLU MLP with the same active parameters.

`python launch/bench_moe.py [--hidden 512] [--experts 8] [--k 2] [--expert_size 512] [--batch 8] [--length 256]
[--dtype float32] [--repeats 5]`: a jitted forward + backward (gradients for the params and the input) of
`MoeMlp` (sparse dispatch, with the "blocks" grouped matmul and with `jax.lax.ragged_dot`; and the
"dense" every-expert reference) and of the dense `Mlp` with intermediate size k * expert_size, so
both do the same useful matmul work per token. Prints tokens/s for each, best of --repeats, calls
interleaved. The defaults are a small30m-sized layer (hidden 512, 8 experts, top-2, 512 per expert).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def bench_moe_vs_dense(
    hidden: int = 512,
    experts: int = 8,
    k: int = 2,
    expert_size: int = 512,
    batch: int = 8,
    length: int = 256,
    dtype: str = "float32",
    repeats: int = 5,
) -> dict[str, float]:
    """tokens/s of a jitted fwd+bwd of each variant (see the module docstring)."""
    from flax import linen as nn

    from align_jax.models.config import ModelConfig
    from align_jax.models.layers import Mlp
    from align_jax.models.moe import MoeMlp
    from align_jax.sharding import Sharder

    common = dict(hidden_size=hidden, num_heads=max(1, hidden // 64), num_layers=1, dtype=dtype)
    moe_cfg = ModelConfig(
        model_type="qwen3_moe",
        intermediate_size=expert_size,
        num_experts=experts,
        num_experts_per_tok=k,
        moe_intermediate_size=expert_size,
        **common,
    )
    dense_cfg = ModelConfig(intermediate_size=k * expert_size, **common)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, length, hidden)), jnp.float32).astype(dtype)
    mask = jnp.ones((batch, length), bool)

    def step(module, with_mask: bool):
        args = (x, mask) if with_mask else (x,)
        params = nn.meta.unbox(module.init(jax.random.key(0), *args)["params"])

        def loss(p, x):
            out = module.apply({"params": p}, x, *args[1:])
            out, aux = out if with_mask else (out, 0.0)
            return jnp.sum(out.astype(jnp.float32) ** 2) + aux

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: jax.block_until_ready(grad(params, x))

    variants = {
        "moe_sparse_blocks": step(MoeMlp(moe_cfg.replace(moe_impl="ragged"), Sharder(), "blocks"), True),
        "moe_sparse_ragged_dot": step(MoeMlp(moe_cfg.replace(moe_impl="ragged"), Sharder(), "ragged_dot"), True),
        "moe_dense_all_experts": step(MoeMlp(moe_cfg.replace(moe_impl="dense"), Sharder()), True),
        "dense_mlp_same_active": step(Mlp(dense_cfg, Sharder()), False),
    }
    from bench_generate import best_times  # launch/ is on sys.path when this runs as a script

    times = best_times(list(variants.values()), repeats)
    tokens = batch * length
    result = {name: tokens / t for name, t in zip(variants, times, strict=True)}
    print(f"backend={jax.default_backend()} devices={jax.device_count()} dtype={dtype}")
    print(f"layer: hidden={hidden} experts={experts} top-{k} expert_size={expert_size}; batch {batch} x {length}")
    for name, tps in result.items():
        print(f"  {name:24s} {tps:12,.0f} tokens/s (fwd+bwd)")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 512), ("experts", 8), ("k", 2), ("expert_size", 512), ("batch", 8)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    bench_moe_vs_dense(a.hidden, a.experts, a.k, a.expert_size, a.batch, a.length, a.dtype, a.repeats)


if __name__ == "__main__":
    main()

"""The mixture-of-experts MLP: sparse dispatch == dense reference, parity with transformers' blocks, the
load-balancing loss, work that scales with T*k, and the same numbers on a mesh with an expert axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding

from align_jax.models.config import ModelConfig
from align_jax.models.moe import (
    MoeMlp,
    block_rows,
    dispatch_layout,
    grouped_matmul,
    load_balancing_loss,
)
from align_jax.sharding import DEFAULT_RULES, MESH_AXES, Sharder, make_mesh, tree_shardings


def make_cfg(**kw) -> ModelConfig:
    base = dict(
        model_type="qwen3_moe",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        dtype="float32",
    )
    return ModelConfig(**{**base, **kw})


def inputs(batch: int, length: int, hidden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, hidden)), jnp.float32)
    mask = np.ones((batch, length), bool)
    mask[0, length - 3 :] = False  # right padding on one row, left on another
    mask[-1, :2] = False
    return x, jnp.asarray(mask)


def init(cfg: ModelConfig, x, mask, seed: int = 0):
    params = nn.meta.unbox(MoeMlp(cfg, Sharder()).init(jax.random.key(seed), x, mask)["params"])
    # Wider than the 0.02 init: a decisive router (no near-ties to flip) and outputs of order 1.
    return {
        "router": {"kernel": params["router"]["kernel"] * 50.0},
        "experts": jax.tree.map(lambda w: w * 15.0, params["experts"]),
    }


def loss_and_grads(module: MoeMlp, params, x, mask):
    def loss(p, x):
        out, aux = module.apply({"params": p}, x, mask)
        return jnp.sum(jnp.sin(out)) + aux, (out, aux)

    (_, (out, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, aux, grads


def assert_trees_close(a, b, rtol=5e-5):
    """Leaf by leaf, to rtol of the leaf's largest entry: gradients are long float32 sums whose order differs."""
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        scale = float(np.abs(np.asarray(v)).max())
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=rtol * scale, err_msg=str(path))


def test_param_tree_paths_shapes_and_logical_axes():
    cfg = make_cfg(num_experts=6, moe_intermediate_size=12)
    x, mask = inputs(2, 5, 16)
    boxed = MoeMlp(cfg, Sharder()).init(jax.random.key(0), x, mask)["params"]
    flat = traverse_util.flatten_dict(boxed)
    assert {"/".join(k): (v.value.shape, v.names) for k, v in flat.items()} == {
        "router/kernel": ((16, 6), ("embed", None)),
        "experts/gate_proj": ((6, 16, 12), ("expert", "embed", "mlp")),
        "experts/up_proj": ((6, 16, 12), ("expert", "embed", "mlp")),
        "experts/down_proj": ((6, 12, 16), ("expert", "mlp", "embed")),
    }


# T=32, B=2, X=4: blocks of 4 rows for k=1 and 8 rows for k=2, so the padding of runs is exercised.
@pytest.mark.parametrize(
    "k, norm, grouped",
    [(1, True, "blocks"), (1, False, "blocks"), (2, True, "blocks"), (2, False, "blocks"), (2, False, "ragged_dot")],
)
def test_sparse_equals_dense(k, norm, grouped):
    cfg = make_cfg(num_experts_per_tok=k, norm_topk_prob=norm)
    x, mask = inputs(2, 32, 16)
    params = init(cfg, x, mask)
    assert block_rows(2 * 32 * k, cfg.num_experts) == 4 * k
    out_s, aux_s, g_s = loss_and_grads(MoeMlp(cfg.replace(moe_impl="ragged"), Sharder(), grouped), params, x, mask)
    out_d, aux_d, g_d = loss_and_grads(MoeMlp(cfg.replace(moe_impl="dense"), Sharder()), params, x, mask)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_d), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux_s), float(aux_d), rtol=1e-6)
    assert_trees_close(g_s, g_d)
    assert float(jnp.abs(out_d).max()) > 1e-2  # not vacuous: the experts produce something


@pytest.mark.parametrize("b", [1, 4, 8])
def test_grouped_matmul_blocks_equal_ragged_dot_with_empty_experts(b):
    rng = np.random.default_rng(b)
    s, k, num_experts = 40, 2, 6
    # Expert 2 gets nothing, expert 0 a run that is not a multiple of b.
    expert_SK = jnp.asarray(rng.choice([0, 1, 3, 4, 5], size=(s, k), p=[0.37, 0.3, 0.1, 0.13, 0.1]), jnp.int32)
    x_SE = jnp.asarray(rng.standard_normal((s, 5)), jnp.float32)
    w_XEN = jnp.asarray(rng.standard_normal((num_experts, 5, 3)), jnp.float32)

    def via(impl, bb):
        def f(x_SE, w_XEN):
            layout = dispatch_layout(expert_SK, num_experts, bb)
            x_RE = jnp.take(x_SE, layout.token_R, axis=0, mode="fill", fill_value=0)
            y_RN = grouped_matmul(x_RE, w_XEN, layout, impl)
            return jnp.take(y_RN, layout.row_A, axis=0).reshape(s, k, 3)

        return f

    # Reference: each (token, slot) times its expert's matrix, with no sorting at all.
    ref = jnp.einsum("se,skef->skf", x_SE, w_XEN[expert_SK])
    for f in (via("blocks", b), via("ragged_dot", 1)):
        np.testing.assert_allclose(np.asarray(f(x_SE, w_XEN)), np.asarray(ref), rtol=1e-5, atol=1e-5)

    def loss(f):  # a scalar whose gradient reaches every output element with a different weight
        return lambda *a: jnp.sum(jnp.cos(f(*a)))

    g_ref = jax.grad(loss(lambda x, w: jnp.einsum("se,skef->skf", x, w[expert_SK])), (0, 1))(x_SE, w_XEN)
    assert_trees_close(jax.grad(loss(via("blocks", b)), (0, 1))(x_SE, w_XEN), g_ref)
    layout = dispatch_layout(expert_SK, num_experts, b)
    assert int(layout.sizes_X[2]) == 0 and all(int(n) % b == 0 for n in layout.sizes_X)
    assert layout.token_R.shape[0] <= s * k + num_experts * (b - 1)


def hf_block(family: str, norm: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=16, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    if family == "qwen3_moe":
        hf_cfg = transformers.Qwen3MoeConfig(num_experts=5, moe_intermediate_size=8, norm_topk_prob=norm, **common)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
        cfg = make_cfg(model_type="qwen3_moe", num_experts=5, moe_intermediate_size=8, norm_topk_prob=norm)
    else:
        hf_cfg = transformers.MixtralConfig(num_local_experts=5, intermediate_size=8, **common)
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg)
        cfg = make_cfg(model_type="mixtral", num_experts=5, intermediate_size=8, moe_intermediate_size=None)
    with torch.no_grad():  # the experts start uninitialised (torch.empty) and Qwen3's router at zero
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    return block.eval(), cfg


def params_from_hf(block) -> dict:
    """transformers 5's fused layout -> ours: gate.weight [X, E] -> router/kernel [E, X]; experts.gate_up_proj
    [X, 2F, E] (gate rows first) -> gate_proj / up_proj [X, E, F]; experts.down_proj [X, E, F] -> [X, F, E]."""
    gate_up = block.experts.gate_up_proj.detach().numpy()
    f = gate_up.shape[1] // 2
    return {
        "router": {"kernel": jnp.asarray(block.gate.weight.detach().numpy().T)},
        "experts": {
            "gate_proj": jnp.asarray(gate_up[:, :f].transpose(0, 2, 1)),
            "up_proj": jnp.asarray(gate_up[:, f:].transpose(0, 2, 1)),
            "down_proj": jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1)),
        },
    }


@pytest.mark.parametrize("family, norm", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)])
def test_parity_with_transformers_block(family, norm):
    block, cfg = hf_block(family, norm)
    x, mask = inputs(2, 9, 16, seed=1)
    with torch.no_grad():
        ref = block(torch.from_numpy(np.array(x))).numpy()
    params = params_from_hf(block)
    for impl in ("ragged", "dense"):
        out, _ = MoeMlp(cfg.replace(moe_impl=impl), Sharder()).apply({"params": params}, x, mask)
        err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"{family} {impl}: max relative error {err:.2e}"


def test_aux_loss_matches_transformers_for_one_layer():
    block, cfg = hf_block("qwen3_moe")
    x, mask = inputs(2, 9, 16, seed=2)
    _, aux = MoeMlp(cfg, Sharder()).apply({"params": params_from_hf(block)}, x, mask)
    logits = torch.from_numpy(np.array(x)).reshape(-1, 16) @ block.gate.weight.detach().T
    lb = transformers.models.qwen3_moe.modeling_qwen3_moe.load_balancing_loss_func
    ref = lb((logits,), cfg.num_experts, cfg.num_experts_per_tok, torch.from_numpy(np.array(mask)))
    np.testing.assert_allclose(float(aux), float(ref), rtol=1e-5)


def test_aux_loss_by_hand_excludes_padding():
    # 2 rows x 3 tokens, 3 experts, k=2; token (1, 2) is padding.
    probs = np.array(
        [
            [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],
            [[0.7, 0.1, 0.2], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]],
        ],
        np.float32,
    )
    experts = np.array([[[0, 1], [1, 2], [2, 0]], [[0, 2], [2, 0], [2, 1]]], np.int32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    # Real tokens: 5. Assignments per expert among them: e0: 4, e1: 2, e2: 4 (sum 10 = 5 tokens * k).
    f = np.array([4, 2, 4]) / 5
    p = (probs[0].sum(0) + probs[1, :2].sum(0)) / 5
    expected = 3 * np.sum(f * p)
    got = load_balancing_loss(jnp.asarray(probs), jnp.asarray(experts), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # Whatever the padding token holds does not count.
    probs[1, 2], experts[1, 2] = [1.0, 0.0, 0.0], [0, 1]
    again = load_balancing_loss(jnp.asarray(probs), jnp.asarray(experts), jnp.asarray(mask))
    np.testing.assert_allclose(float(again), expected, rtol=1e-6)
    # A uniform router scores k, as in transformers (f sums to k).
    uniform = load_balancing_loss(jnp.full((1, 3, 3), 1 / 3), jnp.asarray([[[0, 1], [1, 2], [2, 0]]]), mask[:1])
    np.testing.assert_allclose(float(uniform), 2.0, rtol=1e-6)
    assert float(load_balancing_loss(jnp.asarray(probs), jnp.asarray(experts), jnp.zeros_like(mask))) == 0.0


def dot_work(fn, *args) -> dict[str, list]:
    """Every dot_general / ragged_dot_general in fn's jaxpr (sub-jaxprs included): flops and lhs shapes."""
    found = {"flops": [], "ragged_lhs": []}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                if eqn.primitive.name == "dot_general":
                    (lc, _), _ = eqn.params["dimension_numbers"]
                    contract = int(np.prod([lhs[d] for d in lc]))
                else:
                    contract = lhs[-1]
                    found["ragged_lhs"].append(lhs)
                found["flops"].append(2 * int(np.prod(out)) * contract)
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_sparse_work_scales_with_tokens_times_k_not_experts():
    b, t, e, f = 2, 64, 16, 32

    def work(num_experts, k, impl, grouped="blocks"):
        cfg = make_cfg(num_experts=num_experts, num_experts_per_tok=k, moe_intermediate_size=f, moe_impl=impl)
        x, mask = inputs(b, t, e)
        module = MoeMlp(cfg, Sharder(), grouped)
        params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, mask))
        return dot_work(lambda p: module.apply(p, x, mask), params)

    def expert_flops(w, num_experts):  # total minus the router's [B*T, E] x [E, X]
        return sum(w["flops"]) - 2 * b * t * e * num_experts

    swiglu = 3 * 2 * e * f  # flops per (token, expert) row through gate, up and down
    for k in (1, 2):
        for x in (8, 16):
            sparse = expert_flops(work(x, k, "ragged"), x)
            # Rows: the T*k assignments plus under 1/4 of padding; the weighted sum over k is tiny.
            assert b * t * k * swiglu <= sparse <= 1.25 * b * t * k * swiglu + 2 * b * t * k * e
            dense = expert_flops(work(x, k, "dense"), x)
            assert dense >= b * t * x * swiglu
    # ragged_dot: exactly T*k rows go in, one row per assignment.
    ragged = work(8, 2, "ragged", "ragged_dot")
    assert set(ragged["ragged_lhs"]) == {(b * t * 2, e), (b * t * 2, f)}


def expert_mesh_and_rules():
    """data 2 x expert 4 over the 8 fake devices (the "expert" axis is built here if sharding.py lacks it)."""
    rules = DEFAULT_RULES if "expert" in dict(DEFAULT_RULES) else (*DEFAULT_RULES, ("expert", "expert"))
    if "expert" in MESH_AXES:
        return make_mesh({"data": 2, "expert": 4}), rules
    axes = (*MESH_AXES, "expert")
    sizes = tuple({"data": 2, "expert": 4}.get(a, 1) for a in axes)
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(sizes, axes, devices=jax.devices(), axis_types=auto), rules


@pytest.mark.parametrize("impl, grouped", [("ragged", "blocks"), ("ragged", "ragged_dot"), ("dense", "auto")])
def test_sharded_on_expert_axis_equals_single_device(impl, grouped):
    cfg = make_cfg(num_experts=8, moe_impl=impl)
    x, mask = inputs(4, 8, 16, seed=3)
    params = init(cfg, x, mask)
    ref_out, ref_aux, ref_grads = loss_and_grads(MoeMlp(cfg, Sharder(), grouped), params, x, mask)

    mesh, rules = expert_mesh_and_rules()
    sharder = Sharder(mesh, rules)
    boxed = MoeMlp(cfg, sharder, grouped).init(jax.random.key(0), x, mask)["params"]
    shardings = tree_shardings(boxed, sharder)
    assert shardings["experts"]["gate_proj"].spec[0] == "expert"
    sharded = jax.device_put(params, shardings)
    xs = jax.device_put(x, NamedSharding(mesh, sharder.spec(("activation_batch", None, None), x.shape)))
    out, aux, grads = loss_and_grads(MoeMlp(cfg, sharder, grouped), sharded, xs, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux), float(ref_aux), rtol=1e-6)
    assert_trees_close(grads, ref_grads)


def test_bf16_compute_runs_and_stays_close_to_fp32():
    cfg = make_cfg()
    x, mask = inputs(2, 16, 16, seed=4)
    params = init(cfg, x, mask)
    ref, _ = MoeMlp(cfg, Sharder()).apply({"params": params}, x, mask)
    out, aux = MoeMlp(cfg.replace(dtype="bfloat16"), Sharder()).apply({"params": params}, x, mask)
    assert out.dtype == jnp.bfloat16 and aux.dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert err < 5e-2

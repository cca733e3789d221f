"""Model merging: each method against its closed form, per-layer statistics on stacked leaves, and whole
checkpoints (stage workdirs, a PPO policy, HF directories) merged into a workdir that loads, exports and
is not recomputed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys

import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import align_jax as aj
from align_jax import checkpoint
from align_jax.merge import METHODS, merge_checkpoints, merge_tensors, merge_trees
from align_jax.merge.methods import layer_name, model_stock_ratio
from align_jax.models.config import RUNTIME_FIELDS
from align_jax.models.hf import abstract_params
from align_jax.stages import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def angle_deg(a, b):
    return math.degrees(math.acos(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))))


# ---------------------------------------------------------------------------------------------------
# One tensor at a time: closed forms


def test_linear_and_task_arithmetic_sums():
    a, b, base = randn(3, 4), randn(3, 4), randn(3, 4)
    np.testing.assert_allclose(merge_tensors("linear", [a, b]), (a + b) / 2, rtol=1e-6)
    # Weights are normalised to sum to 1 unless normalize=False.
    np.testing.assert_allclose(merge_tensors("linear", [a, b], weights=[1, 3]), (a + 3 * b) / 4, rtol=1e-5)
    np.testing.assert_allclose(merge_tensors("linear", [a, b], weights=[1, 3], normalize=False), a + 3 * b, rtol=1e-5)
    got = merge_tensors("task_arithmetic", [a, b], base, weights=[1.0, 2.0], scale=0.5)
    np.testing.assert_allclose(got, base + 0.5 * ((a - base) + 2 * (b - base)), rtol=1e-5, atol=1e-6)
    # Default task-arithmetic weights are 1 each: the plain sum of task vectors.
    np.testing.assert_allclose(merge_tensors("task_arithmetic", [a, b], base), a + b - base, rtol=1e-5, atol=1e-6)
    # The result keeps the anchor's dtype (the base's, else the first model's).
    bf = base.astype("bfloat16")
    assert merge_tensors("task_arithmetic", [a, b], bf).dtype == bf.dtype
    assert merge_tensors("linear", [a.astype(np.float16), b]).dtype == np.float16


def test_slerp_endpoints_exact_and_midpoint_on_the_sphere():
    a, b = randn(5, 3).astype("bfloat16"), randn(5, 3).astype("bfloat16")
    np.testing.assert_array_equal(merge_tensors("slerp", [a, b], t=0.0), a)
    np.testing.assert_array_equal(merge_tensors("slerp", [a, b], t=1.0), b)

    e0, e1 = np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32)
    e0[0, 0], e1[1, 1] = 1.0, 1.0  # orthogonal unit vectors
    stats = {}
    mid = merge_tensors("slerp", [e0, e1], t=0.5, stats=stats)
    assert np.linalg.norm(mid) == pytest.approx(1.0, abs=1e-6)
    assert angle_deg(mid, e0) == pytest.approx(45.0, abs=1e-3) and angle_deg(mid, e1) == pytest.approx(45.0, abs=1e-3)
    assert stats["angle_deg"] == [pytest.approx(90.0)]
    # At t the result is t of the way along the arc, still on the unit sphere.
    q = merge_tensors("slerp", [e0, e1], t=0.2)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-6)
    assert angle_deg(q, e0) == pytest.approx(18.0, abs=1e-3)
    # Colinear endpoints have no plane to rotate in: linear interpolation.
    np.testing.assert_allclose(merge_tensors("slerp", [e0, 3 * e0], t=0.25), 1.5 * e0, rtol=1e-6)


def test_ties_trims_elects_the_sign_by_mass_and_takes_the_disjoint_mean():
    base = randn(6)
    taus = np.array(
        [
            [4.0, -1.0, 2.0, 0.5, 3.0, 0.0],  # top 3 by magnitude: 4, 3, 2
            [-3.0, -2.0, 1.0, 0.1, 2.5, 0.2],  # -3, 2.5, -2
            [1.0, 3.0, -5.0, 0.2, -0.5, 6.0],  # 6, -5, 3
        ],
        np.float32,
    )
    # Trimmed sums [1, 1, -3, 0, 5.5, 6] elect [+, +, -, none, +, +]. Entry 2: one +2 against one -5, the
    # mass decides. Entry 4: two agree (3, 2.5) -> their mean; entry 3: everything trimmed -> 0.
    merged = np.array([4.0, 3.0, -5.0, 0.0, 2.75, 6.0], np.float32)
    got = merge_tensors("ties", list(base + taus), base, density=0.5, scale=0.5)
    np.testing.assert_allclose(got, base + 0.5 * merged, rtol=1e-6, atol=1e-6)
    # Weights scale each trimmed task vector before the election: model 2 doubled flips entry 1's winner set.
    got = merge_tensors("ties", list(base + taus), base, density=0.5, weights=[1, 1, 2])
    np.testing.assert_allclose(got, base + np.array([4.0, 6.0, -10.0, 0.0, 2.75, 12.0]), rtol=1e-6, atol=1e-6)
    # density=1 keeps everything: entry 0 has +4, -3, +1 -> sum +2 -> mean(4, 1).
    got = merge_tensors("ties", list(base + taus), base, density=1.0)
    assert got[0] == pytest.approx(base[0] + 2.5, abs=1e-6)


def test_dare_rescales_survivors_keeps_the_expectation_and_is_seeded():
    base = np.zeros((400, 500), np.float32)
    tau = np.full((400, 500), 2.0, np.float32)
    p = 0.3
    got = merge_tensors("dare_linear", [base + tau], base, drop_rate=p, seed=7, name="w")
    kept = got != 0
    np.testing.assert_allclose(got[kept], 2.0 / (1 - p), rtol=1e-6)  # survivors rescaled by 1/(1-p)
    sigma = math.sqrt(p * (1 - p) / tau.size)
    assert abs(kept.mean() - (1 - p)) < 6 * sigma
    assert abs(got.mean() - 2.0) < 6 * sigma * 2.0 / (1 - p)  # unbiased
    again = merge_tensors("dare_linear", [base + tau], base, drop_rate=p, seed=7, name="w")
    np.testing.assert_array_equal(got, again)
    for other in ({"seed": 8, "name": "w"}, {"seed": 7, "name": "v"}):
        assert not np.array_equal(got, merge_tensors("dare_linear", [base + tau], base, drop_rate=p, **other))
    # Each model draws its own mask.
    first = merge_tensors("dare_linear", [base + tau] * 2, base, drop_rate=p, seed=7, name="w", weights=[1, 0])
    second = merge_tensors("dare_linear", [base + tau] * 2, base, drop_rate=p, seed=7, name="w", weights=[0, 1])
    np.testing.assert_array_equal(first, got)
    assert not np.array_equal(second, got)
    # Without drops DARE is task arithmetic, and dare_ties is TIES without trimming.
    a, b, w0 = randn(4, 6), randn(4, 6), randn(4, 6)
    np.testing.assert_allclose(
        merge_tensors("dare_linear", [a, b], w0, drop_rate=0.0, scale=0.7),
        merge_tensors("task_arithmetic", [a, b], w0, scale=0.7),
    )
    np.testing.assert_allclose(
        merge_tensors("dare_ties", [a, b], w0, drop_rate=0.0), merge_tensors("ties", [a, b], w0, density=1.0)
    )
    np.testing.assert_allclose(  # with a density, dare_ties trims too
        merge_tensors("dare_ties", [a, b], w0, drop_rate=0.0, density=0.5),
        merge_tensors("ties", [a, b], w0, density=0.5),
    )


def test_model_stock_ratio_from_the_angle_and_the_point_on_the_line():
    base = randn(8, 8)
    u, v = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    u[0, 0], v[3, 5] = 1.0, 1.0
    theta = math.radians(60.0)
    tau1, tau2 = 0.3 * u, 0.3 * (math.cos(theta) * u + math.sin(theta) * v)
    stats = {}
    got = merge_tensors("model_stock", [base + tau1, base + tau2], base, stats=stats)
    cos = math.cos(theta)
    t = 2 * cos / (1 + cos)
    assert stats["cos"] == [pytest.approx(cos, abs=1e-6)] and stats["t"] == [pytest.approx(t, abs=1e-6)]
    average = base + (tau1 + tau2) / 2
    np.testing.assert_allclose(got, t * average + (1 - t) * base, atol=1e-6)
    # On the segment from the anchor to the average, at fraction t.
    along, full = (got - base).ravel(), (average - base).ravel()
    assert angle_deg(along, full) == pytest.approx(0.0, abs=0.1)
    assert np.linalg.norm(along) / np.linalg.norm(full) == pytest.approx(t, rel=1e-5)

    # Three models: cos is the mean pairwise cosine and t = 3 cos / (1 + 2 cos).
    w = np.zeros((8, 8), np.float32)
    w[7, 1] = 1.0
    taus = [u, math.cos(theta) * u + math.sin(theta) * v, w]  # cosines 0.5, 0, 0
    stats = {}
    merge_tensors("model_stock", [base + x for x in taus], base, stats=stats)
    assert stats["t"] == [pytest.approx(3 * (0.5 / 3) / (1 + 2 * (0.5 / 3)), abs=1e-6)]

    # cos <= 0 keeps the anchor; all task vectors zero (no model changed it): the anchor too.
    np.testing.assert_array_equal(merge_tensors("model_stock", [base + u, base - u], base), base)
    np.testing.assert_array_equal(merge_tensors("model_stock", [base, base], base), base)
    assert model_stock_ratio(1.0, 5) == 1.0 and model_stock_ratio(-0.2, 3) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_stacked_leaves_merge_layer_by_layer(method):
    layers = 3
    base = randn(layers, 4, 5)
    # Each layer's task vectors at a different angle and scale, so whole-tensor statistics would differ.
    models = [
        base + randn(layers, 4, 5) * np.array([0.1, 1.0, 5.0], np.float32).reshape(layers, 1, 1) for _ in range(3)
    ]
    models[1][2] = base[2] - (models[0][2] - base[2])  # layer 2: opposite task vectors
    models = models[:2] if method == "slerp" else models
    kw = {
        "ties": {"density": 0.4},
        "dare_linear": {"drop_rate": 0.5},
        "dare_ties": {"drop_rate": 0.5},
        "slerp": {"t": 0.3},
    }.get(method, {})
    b = None if method in ("linear", "slerp") else base
    stats = {}
    stacked = merge_tensors(method, models, b, name="layers/stack/x", layer_axis=True, stats=stats, **kw)
    for i in range(layers):
        one = merge_tensors(
            method, [m[i] for m in models], None if b is None else b[i], name=layer_name("layers/stack/x", i), **kw
        )
        np.testing.assert_array_equal(stacked[i], one)
    if method == "model_stock":
        assert len(stats["t"]) == layers and stats["t"][2] == 0.0 < stats["t"][0]
        whole = merge_tensors(method, models, b, name="layers/stack/x", **kw)
        assert not np.allclose(whole, stacked)

    # merge_trees: stacked leaves by layer, others whole.
    tree = lambda m, e: {"layers": {"stack": {"x": m}}, "embed": {"embedding": e}}  # noqa: E731
    embeds = [randn(6, 2) for _ in models]
    trees = [tree(m, e) for m, e in zip(models, embeds, strict=True)]
    got = merge_trees(method, trees, None if b is None else tree(base, randn(6, 2)), **kw)
    np.testing.assert_array_equal(got["layers"]["stack"]["x"], stacked)
    assert got["embed"]["embedding"].shape == (6, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a: merge_tensors("ties", [a, a]), "needs a base"),
        (lambda a: merge_tensors("slerp", [a, a, a]), "exactly 2"),
        (lambda a: merge_tensors("slerp", [a, a], weights=[1, 1]), "no weights"),
        (lambda a: merge_tensors("model_stock", [a], a), "at least 2"),
        (lambda a: merge_tensors("linear", [a, a], a), "no base"),
        (lambda a: merge_tensors("ties", [a], a, density=0.0), "density"),
        (lambda a: merge_tensors("ties", [a], a, density=1.5), "density"),
        (lambda a: merge_tensors("dare_ties", [a], a, drop_rate=1.0), "drop_rate"),
        (lambda a: merge_tensors("slerp", [a, a], t=1.5), "t=1.5"),
        (lambda a: merge_tensors("linear", [a, a], weights=[1.0]), "1 weights for 2 models"),
        (lambda a: merge_tensors("linear", [a, a], weights=[1, -1]), "sum to 0"),
        (lambda a: merge_tensors("task_arithmetic", [a], a, density=0.5), "takes no"),
        (lambda a: merge_tensors("model_stock", [a, a[:1]], a, name="w"), "w: model 1 has shape"),
        (lambda a: merge_tensors("magic", [a]), "unknown merge method"),
    ],
)
def test_bad_arguments_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call(randn(2, 3))


# ---------------------------------------------------------------------------------------------------
# Whole checkpoints on disk

CFG = aj.ModelConfig(
    vocab_size=272, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    dtype="float32", eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def random_params(cfg, seed, like=None):
    r = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
    out = {}
    for path, x in flat.items():
        if like is not None:  # a fine-tune: the base plus a change, half shared with the other fine-tunes
            shared = np.random.default_rng(99).standard_normal(x.shape)
            out[path] = like[path] + (0.01 * (shared + r.standard_normal(x.shape))).astype(np.float32)
        else:
            out[path] = (1.0 if path[-1] == "scale" else 0.0) + 0.05 * r.standard_normal(x.shape).astype(np.float32)
    return out


def write_workdir(path, params, stage="sft", tokenizer=None, key=None, **stage_cfg):
    config = ml_collections.ConfigDict({"stage": stage, **stage_cfg})
    saved = build.saved_config(config, CFG)
    tree = traverse_util.unflatten_dict(params)
    ckpt = checkpoint.Checkpointer(str(path), async_save=False)
    ckpt.save(3, {"params": {key: tree, "value": {"w": np.ones(2, np.float32)}} if key else tree}, {}, saved)
    ckpt.close()
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, build.TOKENIZER_DIR))
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from align_jax.data.bpe import train_tokenizer

    tmp = tmp_path_factory.mktemp("merge_sources")
    tok = train_tokenizer(["What is two plus two? It is four.", "hello world"], vocab_size=CFG.vocab_size)
    p0 = random_params(CFG, 0)
    pa, pb, pc = (random_params(CFG, s, like=p0) for s in (1, 2, 3))
    w0 = write_workdir(tmp / "base", p0, tokenizer=tok)
    wa = write_workdir(tmp / "dpo", pa, stage="dpo", tokenizer=tok)
    hb = aj.save_pretrained(CFG, traverse_util.unflatten_dict(pb), str(tmp / "hf_b"))  # no tokenizer
    ppo = write_workdir(tmp / "ppo", pc, stage="grpo", key="policy", grpo={"algorithm": "ppo"})
    rm = write_workdir(tmp / "rm", pa, stage="rm")
    unflat = traverse_util.unflatten_dict
    return dict(w0=w0, wa=wa, hb=hb, ppo=ppo, rm=rm, p0=unflat(p0), pa=unflat(pa), pb=unflat(pb), pc=unflat(pc))


def restored(workdir):
    abstract = nn.meta.unbox(abstract_params(CFG))
    return checkpoint.restore_decoder_params(workdir, abstract)


def assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_merge_checkpoints_linear_loads_exports_and_skips_when_done(sources, tmp_path):
    from align_jax.chat import ChatModel

    out = str(tmp_path / "merged")
    summary = merge_checkpoints("linear", [sources["wa"], sources["hb"]], out, weights=[0.25, 0.75])
    assert summary["n_tensors"] == len(traverse_util.flatten_dict(sources["pa"])) and "skipped" not in summary
    assert summary["tokenizer"] == sources["wa"] and summary["dtype"] == "float32"
    expected = merge_trees("linear", [sources["pa"], sources["pb"]], weights=[0.25, 0.75])
    assert_trees_equal(restored(out), expected)
    saved = checkpoint.read_config(out)
    assert saved["config"]["stage"] == "merge" and saved["config"]["merge"]["weights"] == [0.25, 0.75]
    assert checkpoint.model_config_of(out) == checkpoint.model_config_of(sources["wa"])

    model = ChatModel.load(out)
    assert model.cfg.hidden_size == CFG.hidden_size and len(model.tokenizer) == CFG.vocab_size
    assert_trees_equal(model.params, expected)

    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from export import export

    hf_dir = export(out, str(tmp_path / "merged_hf"))
    _, params = aj.load_pretrained(hf_dir)
    assert_trees_equal(params, expected)
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json"))

    # The same recipe again (weights spelled differently but equal): nothing is recomputed.
    stamp = os.stat(os.path.join(out, "summary.json")).st_mtime_ns
    again = merge_checkpoints("linear", [sources["wa"], sources["hb"]], out, weights=(0.25, 0.75))
    assert again["skipped"] is True and again["seconds"] == summary["seconds"]
    assert os.stat(os.path.join(out, "summary.json")).st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match=r"different recipe.*weights"):
        merge_checkpoints("linear", [sources["wa"], sources["hb"]], out)
    redo = merge_checkpoints("linear", [sources["wa"], sources["hb"]], out, overwrite=True)
    assert "skipped" not in redo
    assert_trees_equal(restored(out), merge_trees("linear", [sources["pa"], sources["pb"]]))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary directories left


def test_merge_overwrite_replaces_only_a_merge_and_never_its_inputs(sources, tmp_path):
    # Before: with overwrite=True any non-empty --out was swapped out and deleted (a folder of runs, a
    # training workdir), and the result was created 0700.
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt: not a merged workdir"):
        merge_checkpoints("linear", [sources["wa"], sources["hb"]], str(runs), overwrite=True)
    assert os.listdir(runs) == ["notes.txt"]
    with pytest.raises(ValueError, match=r"merge target .* contains the source"):
        merge_checkpoints("linear", [sources["wa"], sources["hb"]], os.path.dirname(sources["wa"]), overwrite=True)
    with pytest.raises(ValueError, match=r"merge target .* is inside the source"):
        merge_checkpoints("linear", [sources["wa"], sources["hb"]], os.path.join(sources["wa"], "m"))
    trained = shutil.copytree(sources["wa"], tmp_path / "trained")  # a training workdir
    with pytest.raises(FileExistsError, match="not a merged workdir"):
        merge_checkpoints("linear", [sources["hb"]], str(trained), overwrite=True)
    old = os.umask(0o022)
    try:
        out = merge_checkpoints("linear", [sources["wa"], sources["hb"]], str(tmp_path / "m"))["out"]
        assert os.stat(out).st_mode & 0o777 == 0o755
        assert merge_checkpoints("linear", [sources["wa"]], out, overwrite=True)["sources"] == [sources["wa"]]
    finally:
        os.umask(old)


def test_model_stock_over_a_workdir_an_hf_dir_and_a_ppo_policy(sources, tmp_path, capsys):
    models = [sources["wa"], sources["hb"], sources["ppo"]]
    out = str(tmp_path / "stock")
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import merge as merge_cli

    assert merge_cli.main(["--method", "model_stock", "--base", sources["w0"], "--models", ",".join(models),
                           "--out", out, "--hf_out", str(tmp_path / "stock_hf")]) == 0  # fmt: skip
    # One human line; the numbers are in OUT/summary.json.
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"model_stock of 3 model(s): {out} merged in ") and printed.endswith(
        str(tmp_path / "stock_hf")
    )
    summary = json.loads((tmp_path / "stock" / "summary.json").read_text())
    expected = merge_trees("model_stock", [sources["pa"], sources["pb"], sources["pc"]], sources["p0"])
    assert_trees_equal(restored(out), expected)
    assert_trees_equal(aj.load_pretrained(str(tmp_path / "stock_hf"))[1], expected)
    t = summary["stats"]["t"]
    # Task vectors with half their variance shared: cos ~ 1/2, so t ~ 3 cos / (1 + 2 cos) = 3/4 (noisier for
    # the small norm scales).
    assert t["by_tensor"]["embed/embedding"] == pytest.approx(0.75, abs=0.02) and 0.6 < t["mean"] < 0.8
    assert set(t["by_tensor"]) == {"/".join(k) for k in traverse_util.flatten_dict(expected)}
    assert len(t["per_layer"]["layers/stack/attn/q_proj/kernel"]) == CFG.num_layers
    assert "embed/embedding" not in t["per_layer"]
    assert summary["tokenizer"] == sources["wa"] and summary["source_steps"][sources["wa"]] == 3

    # Options a method does not take, and a reward model, are refused with the reason.
    with pytest.raises(SystemExit):
        merge_cli.main(["--method", "model_stock", "--base", sources["w0"], "--models", ",".join(models),
                        "--out", str(tmp_path / "x"), "--t", "0.5"])  # fmt: skip
    assert "takes no ['t']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reward model"):
        merge_checkpoints("linear", [sources["wa"], sources["rm"]], str(tmp_path / "y"))


def test_hf_sources_keep_the_anchor_dtype_and_must_share_the_architecture(sources, tmp_path):
    from tests import hf_models

    a = hf_models.save(hf_models.build("qwen2", seed=0).to(dtype=__import__("torch").bfloat16), tmp_path / "a")
    b = hf_models.save(hf_models.build("qwen2", seed=1), tmp_path / "b")
    out = str(tmp_path / "ab")
    summary = merge_checkpoints("slerp", [a, b], out, t=0.3)
    assert summary["dtype"] == "bfloat16" and summary["tokenizer"] is None
    _, pa = aj.load_pretrained(a, dtype="bfloat16")
    _, pb = aj.load_pretrained(b, dtype="float32")
    expected = merge_trees("slerp", [pa, pb], t=0.3)
    cfg = checkpoint.model_config_of(out, **{k: "bfloat16" for k in ("param_dtype", "dtype")})
    got = checkpoint.restore_decoder_params(out, nn.meta.unbox(abstract_params(cfg)))
    assert_trees_equal(got, expected)
    assert checkpoint.read_config(out)["runtime"]["param_dtype"] == "bfloat16"
    assert {k for k in RUNTIME_FIELDS} <= set(checkpoint.read_config(out)["runtime"])

    wide = hf_models.save(hf_models.build("qwen2", seed=2, intermediate_size=80), tmp_path / "wide")
    with pytest.raises(ValueError, match=re.escape(wide) + ": intermediate_size=80.*intermediate_size=96"):
        merge_checkpoints("linear", [a, wide], str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        merge_checkpoints("linear", [a, str(tmp_path / "nothing")], str(tmp_path / "bad"))

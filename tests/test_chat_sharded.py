"""Evaluation models sharded over the run's mesh (align_jax/chat.py, eval/reward.py, stages/evaluation.py):
each device holds its slice of the weights, and generation and scoring give what one device gives."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from align_jax import checkpoint
from align_jax.chat import ChatModel, boxed_abstract, default_sharder, eval_sharder
from align_jax.eval.perplexity import perplexity
from align_jax.eval.reward import RewardScorer
from align_jax.generate import generate
from align_jax.models.config import ModelConfig
from align_jax.models.heads import ScalarModel
from align_jax.models.hf import abstract_params, save_pretrained
from align_jax.models.transformer import init_params
from align_jax.sharding import Sharder, make_mesh, tree_shardings
from align_jax.stages import build, evaluation

PROMPTS = ["What is two plus two?", "Name a colour.", "hello world", "Say something short.", "Count to three."]
CORPUS = [*PROMPTS, "It is four.", "Blue.", "One two three.", "system user assistant"]


def one_device() -> Sharder:
    """The unsharded reference: every param whole on one device."""
    return Sharder(make_mesh({}, devices=jax.devices()[:1]))


def is_box(_, x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def host_params(boxed, seed: int) -> dict:
    """Random float32 params of an abstract tree, made on the host: no init to compile (seconds each)."""
    r = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    return traverse_util.unflatten_dict(
        {k: ((k[-1] == "scale") + 0.1 * r.standard_normal(x.shape)).astype(np.float32) for k, x in flat.items()}
    )


@pytest.fixture(scope="module")
def parts():
    from align_jax.data.bpe import train_tokenizer

    tok = train_tokenizer(CORPUS * 4, vocab_size=300, template="chatml")
    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype="float32",
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # On one device, as a caller's unsharded params would be.
    return cfg, jax.device_put(host_params(abstract_params(cfg), 0), jax.devices()[0]), tok


@pytest.fixture(scope="module")
def replicated(parts):
    cfg, params, tok = parts
    return ChatModel(cfg, params, tok, sharder=one_device(), batch_size=8)


@pytest.fixture(scope="module")
def sharded(parts):
    cfg, params, tok = parts
    return ChatModel(cfg, params, tok, batch_size=8)  # the default: every device on fsdp


@pytest.fixture(scope="module")
def workdir(parts, tmp_path_factory):
    """An SFT stage workdir holding the params, as training leaves it."""
    cfg, params, tok = parts
    path = str(tmp_path_factory.mktemp("chat_sharded") / "sft")
    ckpt = checkpoint.Checkpointer(path, async_save=False)
    ckpt.save(
        1, {"params": jax.device_get(params)}, {}, build.saved_config(ml_collections.ConfigDict({"stage": "sft"}), cfg)
    )
    ckpt.close()
    tok.save_pretrained(os.path.join(path, build.TOKENIZER_DIR))
    return path


def device_bytes(params) -> dict[jax.Device, int]:
    """Bytes of params each device holds."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def assert_fsdp_sharded(cfg: ModelConfig, params, sharder: Sharder) -> None:
    """Every leaf with an `embed` axis that fsdp divides is split over fsdp along it (the default rules);
    a device holds 1/fsdp of such a leaf and none holds more than its share of the whole tree."""
    n = sharder.mesh.shape["fsdp"]
    boxes = traverse_util.flatten_dict(boxed_abstract(cfg, sharder), is_leaf=is_box)
    flat = traverse_util.flatten_dict(params)
    assert set(boxes) == set(flat)
    divisible = 0
    for path, box in boxes.items():
        leaf, want = flat[path], list(box.value.shape)
        if "embed" in box.names and want[box.names.index("embed")] % n == 0:
            want[box.names.index("embed")] //= n
            divisible += 1
        assert leaf.sharding.shard_shape(leaf.shape) == tuple(want), path
        assert leaf.addressable_shards[0].data.shape == tuple(want), path
    assert divisible == len(boxes)  # this model: every leaf has an embed axis that 8 divides
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = device_bytes(params)
    assert len(per_device) == sharder.mesh.size
    # Sharded over fsdp, replicated over the other axes: each device holds exactly total / fsdp.
    assert set(per_device.values()) == {total // n}


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"fsdp": 4, "data": 2}])
def test_params_are_sharded_over_fsdp(parts, mesh):
    cfg, params, tok = parts
    model = ChatModel(cfg, params, tok, sharder=eval_sharder(mesh))
    assert dict(model.sharder.mesh.shape) == {"data": 1, "tensor": 1, "sequence": 1, "expert": 1, **mesh}
    assert_fsdp_sharded(cfg, model.params, model.sharder)


def test_default_mesh_puts_every_device_on_fsdp():
    assert default_sharder().mesh.shape["fsdp"] == jax.local_device_count() == 8


def test_loading_reads_straight_into_the_shardings(parts, workdir, tmp_path):
    cfg, params, tok = parts
    sharder = eval_sharder({"fsdp": 8})
    hf_dir = str(tmp_path / "hf")
    save_pretrained(cfg, params, hf_dir, tokenizer=tok)
    for source in (workdir, hf_dir):
        model = ChatModel.load(source, sharder=sharder)
        assert_fsdp_sharded(model.cfg, model.params, sharder)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, model.params, params))), source


def test_greedy_generation_matches_one_device(parts, replicated, sharded):
    cfg, _, _ = parts
    prompts = [*PROMPTS, "Name a number.", "What is blue?", "hello"]  # one full batch of 8
    assert replicated.generate(prompts, max_new_tokens=12) == sharded.generate(prompts, max_new_tokens=12)
    # Token for token, with the shapes ChatModel.generate used (no new compile): a text match could hide
    # a difference in tokens that decode alike.
    ids = [replicated.prompt_ids(p) for p in prompts]
    kw = dict(max_new_tokens=12, eos_id=replicated.eot_ids, seed=0)
    # Sharded params decode through the layer scan (no whole-layer gathers), one device's unstacked.
    assert (replicated.unstack_layers, sharded.unstack_layers) == (True, False)
    want = generate(cfg, replicated.params, ids, sharder=replicated.sharder, unstack_layers=True, **kw)
    got = generate(cfg, sharded.params, ids, sharder=sharded.sharder, unstack_layers=False, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
    assert int(np.asarray(want.lengths).max()) > 1  # the rows did decode past their first token


def test_scoring_matches_one_device(replicated, sharded):
    kw = dict(seq_len=128, batch_size=8, limit_batches=2)
    want = perplexity(
        replicated.cfg, replicated.params, replicated.tokenizer, "demo:sft_eval", sharder=one_device(), **kw
    )
    got = perplexity(sharded.cfg, sharded.params, sharded.tokenizer, "demo:sft_eval", sharder=sharded.sharder, **kw)
    assert got["tokens"] == want["tokens"] > 0
    assert got["nll"] == pytest.approx(want["nll"], abs=1e-5)
    np.testing.assert_allclose(sharded.embed(PROMPTS), replicated.embed(PROMPTS), atol=1e-5)


def test_reward_scores_match_one_device(parts):
    cfg, _, tok = parts
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda r: ScalarModel(cfg).init(r, tokens, tokens, tokens)["params"], jax.random.key(0))
    params = host_params(boxed, 1)

    def scorer(sharder: Sharder) -> RewardScorer:
        placed = jax.device_put(params, tree_shardings(boxed, sharder))
        return RewardScorer(ScalarModel(cfg, sharder), placed, tok, batch_size=8, max_len=128)

    one, many = scorer(one_device()), scorer(eval_sharder({"fsdp": 8}))
    # Sharded but the head's scalar bias.
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert max(device_bytes(many.params).values()) <= total // 8 + 4
    responses = ["It is four.", "Blue.", "hi", "One two three.", "ok"]
    np.testing.assert_allclose(many.score(PROMPTS, responses), one.score(PROMPTS, responses), atol=1e-5)


# -- the eval stage passes its mesh to every model it loads ---------------------------------------------


def eval_config(mesh: dict | None) -> ml_collections.ConfigDict:
    from tests.test_configs import load_preset

    c = load_preset("pipeline", "tiny")
    c.unlock()
    if mesh is not None:
        c.eval.mesh = ml_collections.ConfigDict(mesh)
    c.eval.batch_size = 8
    return c


class Resolver:
    def __init__(self, workdir: str):
        self.workdir = workdir

    def __call__(self, ref: str, by: str = "", key: str = "") -> str:
        return os.path.join(self.workdir, ref.removeprefix("stage:"))


def test_eval_stage_mesh_from_config():
    assert dict(evaluation.eval_sharder(eval_config(None)).mesh.shape)["fsdp"] == 8
    sharder = evaluation.eval_sharder(eval_config({"fsdp": 4, "data": 2}))
    assert (sharder.mesh.shape["fsdp"], sharder.mesh.shape["data"]) == (4, 2)
    with pytest.raises(ValueError, match=r"config\.eval\.mesh"):
        evaluation.eval_sharder(eval_config({"fsdp": 3}))


def test_eval_stage_loads_models_on_its_mesh(workdir, monkeypatch):
    config = eval_config({"fsdp": 4, "data": 2})
    sharder = evaluation.eval_sharder(config)
    resolve = Resolver(os.path.dirname(workdir))
    ev = evaluation._ModelEval(config, resolve, "", None, "", None, [], {}, "", sharder)
    model = ev.load("sft")  # a stage workdir, restored by the real loader
    assert model.sharder is sharder
    assert_fsdp_sharded(model.cfg, model.params, sharder)

    # The base model from scratch: the SFT run's seeded init, made straight into the eval shardings.
    base = evaluation.base_model(config, resolve, 8, sharder=sharder)
    assert_fsdp_sharded(base.cfg, base.params, sharder)
    fresh = init_params(base.cfg, jax.random.key(int(config.sft.seed)))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, base.params, fresh)))

    # The reward and PAS models: the loaders get the same sharder.
    seen = {}
    from align_jax.pas.augment import Augmenter

    monkeypatch.setattr(RewardScorer, "load", classmethod(lambda cls, d, **k: seen.setdefault("rm", k["sharder"])))
    monkeypatch.setattr(Augmenter, "load", classmethod(lambda cls, d, **k: seen.setdefault("pas", k["sharder"])))
    evaluation._reward_model(config, resolve, sharder)
    evaluation._pas_model(config, resolve, sharder)
    assert seen == {"rm": sharder, "pas": sharder}

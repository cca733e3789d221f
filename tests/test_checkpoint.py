"""Orbax checkpoints and the init precedence: resume > init_from (HF dir or workdir) > scratch."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest

import align_jax as aj
from align_jax import checkpoint
from align_jax.stages import build

CFG = aj.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)


def run_config(**top):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = top.get("init_from", "")
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            schedule="constant",
            warmup_steps=0,
            min_lr_ratio=1.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=0.0,
        )
    )
    c.train = ml_collections.ConfigDict(dict(steps=10))
    return c


def setup(mesh_shape):
    sharder = aj.Sharder(aj.make_mesh(mesh_shape))
    return build.setup_state(CFG, sharder, run_config())


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_round_trip_into_another_mesh(tmp_path):
    s1 = setup({"fsdp": 8})
    ck = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    state, _, how = build.initial_state(s1, run_config(), ck, str(tmp_path))
    assert how == "scratch"
    state = state.replace(step=state.step + 7)
    ck.save(7, state, {"epoch": 1, "position": 42}, {"hello": "world"})
    ck.close()

    # Restore on a different mesh: arrays land in the new shardings.
    s2 = setup({"fsdp": 2, "tensor": 4})
    ck2 = checkpoint.Checkpointer(str(tmp_path))
    restored, data_state, how = build.initial_state(s2, run_config(), ck2, str(tmp_path))
    assert how == "resumed" and int(restored.step) == 7 and data_state == {"epoch": 1, "position": 42}
    assert_same(jax.device_get(restored), jax.device_get(state))
    kernel = restored.params["layers"]["stack"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert checkpoint.read_config(str(tmp_path)) == {"hello": "world"}
    ck2.close()


def test_init_from_workdir_takes_params_only(tmp_path):
    src = str(tmp_path / "sft")
    s = setup({"data": 8})
    ck = checkpoint.Checkpointer(src)
    state, _, _ = build.initial_state(s, run_config(), ck, src)
    trained = state.replace(step=state.step + 3, params=jax.tree.map(lambda x: x + 1.0, state.params))
    ck.save(3, trained, {"position": 9}, build.saved_config(ml_collections.ConfigDict({"a": 1}), CFG))
    ck.close()

    dst = str(tmp_path / "dpo")
    ck2 = checkpoint.Checkpointer(dst)
    new, data_state, how = build.initial_state(s, run_config(init_from=src), ck2, dst)
    assert how == "init_from_workdir" and data_state == {} and int(new.step) == 0
    assert_same(jax.device_get(new.params), jax.device_get(trained.params))
    # Fresh optimizer state, not the source run's.
    assert_same(jax.device_get(new.opt_state), jax.device_get(s.optimizer.init(trained.params)))
    assert checkpoint.model_config_of(src, dtype="float32") == CFG
    # Once this run has its own checkpoint, resuming wins over init_from.
    ck2.save(1, new.replace(step=new.step + 1), {}, {})
    ck2.close()
    _, _, how = build.initial_state(s, run_config(init_from=src), checkpoint.Checkpointer(dst), dst)
    assert how == "resumed"


def test_init_from_hf_dir(tmp_path):
    hf_dir = aj.save_pretrained(CFG, aj.init_params(CFG, jax.random.key(3)), tmp_path / "hf")
    s = setup({"fsdp": 4, "tensor": 2})
    ck = checkpoint.Checkpointer(str(tmp_path / "w"))
    state, _, how = build.initial_state(s, run_config(init_from=hf_dir), ck, str(tmp_path / "w"))
    assert how == "init_from_hf"
    assert_same(jax.device_get(state.params), jax.device_get(aj.load_pretrained(hf_dir)[1]))
    ck.close()


def test_bad_init_from(tmp_path):
    s = setup({"data": 8})
    os.makedirs(tmp_path / "empty")
    ck = checkpoint.Checkpointer(str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        build.initial_state(s, run_config(init_from=str(tmp_path / "empty")), ck, str(tmp_path / "w"))
    ck.close()


def test_keeps_last_n_and_the_best(tmp_path):
    s = setup({"data": 8})
    ck = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="eval_loss", async_save=False)
    state, _, _ = build.initial_state(s, run_config(), ck, str(tmp_path))
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        ck.save(step, state, {}, {}, metrics=None if loss is None else {"eval_loss": loss})
    ck.wait()
    assert ck.all_steps() == [2, 4, 5] and ck.best_step() == 2
    ck.close()

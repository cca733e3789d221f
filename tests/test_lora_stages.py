"""LoRA / QLoRA through the stages end to end (config.lora): SFT, RM, DPO, GRPO and PPO from a small SFT
workdir; only adapters train; the reference is the base; resume is exact; checkpoints are adapter-sized;
a LoRA workdir hands its merged weights to the next stage."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from align_jax import checkpoint, stages
from align_jax.lora import tree
from align_jax.metrics import read_metrics
from tests.test_configs import load_preset

# Wide enough that a rank-4 adapter is small beside its kernel (the checkpoint-size check needs that).
SMALL = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


def small(stage, steps=3, rank=4, **lora):
    c = load_preset(stage, "tiny")
    c.unlock()
    c.model.update(**SMALL)
    c.data.update(seq_len=128, batch_size=8, eval_batches=1)
    c.data.eval = ""
    c.mesh.update(data=-1, fsdp=2)
    c.optim.update(lr=3e-3, warmup_steps=0)
    c.train.update(steps=steps, progress=False, log_every=1, eval_every=0, ckpt_every=0, async_checkpoint=False)
    c.lora.update(rank=rank, **lora)
    return c


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A plain (full fine-tuning) SFT workdir: the base every LoRA run here starts from."""
    work = str(tmp_path_factory.mktemp("sft"))
    stages.get("sft").run(small("sft", steps=3, rank=0), work)
    return work


@pytest.fixture(scope="module")
def base_params(sft_dir):
    from flax import linen as nn

    from align_jax.models.hf import abstract_params

    cfg = checkpoint.model_config_of(sft_dir, dtype="float32")  # as the tiny preset computes
    return cfg, jax.device_get(checkpoint.restore_params(sft_dir, nn.meta.unbox(abstract_params(cfg))))


def test_sft_lora_trains_adapters_only_resumes_exactly_and_checkpoints_are_small(sft_dir, base_params, tmp_path):
    from align_jax.stages import runner, sft

    _, base = base_params
    c = small("sft", steps=4)
    c.init_from = sft_dir
    c.train.ckpt_every = 2
    full = str(tmp_path / "full")
    r = runner.Run(sft.spec, c, full)
    summary = runner.drive(r)
    assert summary["init"] == "init_from_workdir" and summary["lora"]["trainable_params"] > 0
    got = losses(full)
    # The checkpoint holds adapters (+ their Adam moments) only: a fraction of the base's bytes.
    stored = checkpoint.restore_raw_params(full, r.setup.abstract_params)
    assert all(tree.is_adapter(p) for p in tree.flatten(stored))
    assert any(float(np.abs(x).max()) > 0 for p, x in tree.flatten(stored).items() if p[-1] == "lora_b")
    base_bytes, ckpt_bytes = tree.nbytes(base), dir_bytes(os.path.join(full, "checkpoints", "4"))
    full_ckpt = dir_bytes(os.path.join(sft_dir, "checkpoints", "3"))  # the same model trained in full
    assert ckpt_bytes < base_bytes / 2 and ckpt_bytes < full_ckpt / 6, (ckpt_bytes, base_bytes, full_ckpt)

    # Resume from step 2 = the uninterrupted run (the base is reloaded from init_from, not the checkpoint).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    again = stages.get("sft").run(c, resumed)
    assert again["init"] == "resumed" and again["start_step"] == 2
    for step in (3, 4):
        assert losses(resumed)[step] == got[step]


def test_sft_lora_steps_leave_the_base_bit_identical(sft_dir, base_params, tmp_path):
    from align_jax.stages import runner, sft

    _, base = base_params
    c = small("sft", steps=3)
    c.init_from = sft_dir
    r = runner.Run(sft.spec, c, str(tmp_path / "w"))
    state, _, how = r.initial_state(None)
    assert how == "init_from_workdir"
    start = jax.device_get(state.params)
    b, seen = r.global_batch(next(r.train_iter)), []
    for _ in range(3):  # one batch, three times: its loss must fall
        state, metrics = r.step_fn(state, b)
        seen.append(float(metrics["loss"]))
    assert seen[2] < seen[1] < seen[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), base)  # to the bit
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), jax.device_get(state.params), start)
    assert all(v > 0 for v in jax.tree.leaves(moved))  # every adapter leaf trained
    # Optimizer moments exist for the adapters alone.
    shapes = [x.shape for x in jax.tree.leaves(state.params)]
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(moments) == sorted(shapes * 2)


def test_qlora_sft_runs_on_an_nf4_base(sft_dir, base_params, tmp_path):
    c = small("sft", steps=3, quantize="nf4", block_size=32)
    c.init_from = sft_dir
    summary = stages.get("sft").run(c, str(tmp_path / "q"))
    assert summary["lora"]["quantize"] == "nf4"
    # The projections (~80% of this model) at 4.5 bits instead of 32; the embedding stays.
    assert summary["lora"]["frozen_bytes"] < 0.4 * tree.nbytes(base_params[1])
    assert all(np.isfinite(v) for v in losses(str(tmp_path / "q")).values())


def test_rm_lora_trains_adapters_and_the_head_and_scores(sft_dir, base_params, tmp_path):
    from align_jax.eval.reward import RewardScorer
    from align_jax.lora.handoff import abstract_trainable
    from align_jax.models.heads import ScalarModel

    cfg, base = base_params
    c = small("rm", steps=4)
    c.init_from = sft_dir
    work = str(tmp_path / "rm")
    summary = stages.get("rm").run(c, work)
    assert summary["final_step"] == 4 and all(np.isfinite(v) for v in losses(work).values())
    decoder = {k: v for k, v in base.items() if k != "lm_head"}
    head = {"kernel": np.zeros((SMALL["hidden_size"],), np.float32), "bias": np.zeros((), np.float32)}
    like = jax.eval_shape(lambda: {"decoder": decoder, "head": head})
    stored = checkpoint.restore_raw_params(work, abstract_trainable(checkpoint.read_config(work), like, "decoder"))
    assert set(stored) == {"decoder", "head"} and all(tree.is_adapter(p) for p in tree.flatten(stored["decoder"]))
    assert float(np.abs(np.asarray(stored["head"]["kernel"])).max()) > 0
    # The scorer reads the LoRA workdir as a plain reward model (base + merged adapters + head), and scores
    # as the adapted model does.
    scorer = RewardScorer.load(work)
    lora_cfg = cfg.replace(lora_rank=4, lora_alpha=16.0)
    adapted = RewardScorer(ScalarModel(lora_cfg), tree.merge(stored, decoder, "decoder"), scorer.tokenizer)
    prompts, responses = ["What is 2 + 2?", "Name a colour."], ["4", "Blue, like the sky."]
    np.testing.assert_allclose(
        scorer.score(prompts, responses), adapted.score(prompts, responses), rtol=1e-4, atol=1e-5
    )


def test_dpo_lora_reference_is_the_base_model(sft_dir, base_params, tmp_path):
    from align_jax.lora import model_apply_fn
    from align_jax.losses.pairs import sequence_logps
    from align_jax.models.apply import apply_fn
    from align_jax.models.transformer import Decoder
    from align_jax.stages import dpo, runner

    cfg, base = base_params
    c = small("dpo", steps=3)
    c.init_from = sft_dir
    r = runner.Run(dpo.spec, c, str(tmp_path / "ref"))
    state, _, _ = r.initial_state(None)
    b = r.global_batch(next(r.train_iter))
    ref = sequence_logps(state.frozen, b, apply_fn=model_apply_fn(Decoder(r.model_cfg, r.sharder)), loss_chunk=0)[0]
    want = sequence_logps(base, b, apply_fn=apply_fn(Decoder(cfg)), loss_chunk=0)[0]
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-6, atol=1e-5)
    assert np.isfinite(float(np.asarray(want).ravel()[0]))

    work = str(tmp_path / "dpo")
    summary = stages.get("dpo").run(c, work)
    got = losses(work)
    assert summary["final_step"] == 3
    assert got[1] == pytest.approx(np.log(2.0), abs=1e-5)  # step 1: B = 0, policy = reference
    assert all(np.isfinite(v) for v in got.values())
    # Precomputed reference log-probs come from the same base (adapters off), and the cache keeps QLoRA's apart.
    c.update(reference="precomputed", ref_cache_dir=str(tmp_path / "cache"))
    c.train.steps = 1
    c.lora.quantize = "nf4"
    stages.get("dpo").run(c, str(tmp_path / "pre"))
    assert losses(str(tmp_path / "pre"))[1] == pytest.approx(np.log(2.0), abs=1e-5)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_grpo_and_ppo_lora(sft_dir, tmp_path, algorithm):
    c = small("grpo", steps=2)
    c.init_from = sft_dir
    c.data.batch_size = 24
    c.update(group_size=3, max_prompt_len=64, max_new_tokens=8, kl_estimator="k1", algorithm=algorithm)
    work = str(tmp_path / algorithm)
    summary = stages.get("grpo").run(c, work)
    rows = [x for x in read_metrics(work) if "loss" in x]
    assert summary["final_step"] == 2 and all(np.isfinite(x["loss"]) for x in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the base: policy = reference at start
    if algorithm == "grpo":
        assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_a_lora_workdir_hands_its_merged_weights_on(sft_dir, base_params, tmp_path):
    """init_from = a LoRA workdir: the next stage starts from base + (alpha / r) B A."""
    from align_jax.lora.handoff import raw_adapters

    _, base = base_params
    first = str(tmp_path / "sft_lora")
    c = small("sft", steps=2, alpha=8.0)
    c.init_from = sft_dir
    stages.get("sft").run(c, first)
    adapters, _, _ = raw_adapters(first)
    want = tree.merged_weights(adapters, base, scale=8.0 / 4, dtype="float32")
    abstract = jax.eval_shape(lambda: base)
    got = jax.device_get(checkpoint.restore_params(first, abstract))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, jax.device_get(want))
    moved = got["layers"]["stack"]["attn"]["q_proj"]["kernel"] - base["layers"]["stack"]["attn"]["q_proj"]["kernel"]
    assert np.abs(moved).max() > 0

    c = small("dpo", steps=1, rank=0)
    c.init_from = first  # a full fine-tuning DPO on the merged SFT-LoRA model
    summary = stages.get("dpo").run(c, str(tmp_path / "dpo"))
    assert summary["init"] == "init_from_workdir" and summary["final_step"] == 1

"""The rm and dpo stages end to end: handoff from SFT, reference modes, cache reuse, resume, scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from align_jax import stages
from align_jax.metrics import read_metrics
from tests.test_configs import load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def small(stage, preset="tiny", **train):
    c = load_preset(stage, preset)
    c.unlock()
    c.model.update(**SMALL)
    c.data.update(seq_len=128, batch_size=8, eval_batches=2)
    c.mesh.update(data=-1, fsdp=2)  # 4 x 2 over the 8 test devices: a sharded path
    c.train.update(progress=False, log_every=1, eval_every=0, ckpt_every=0, async_checkpoint=False, **train)
    return c


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("sft")
    c = small("sft", steps=8)
    c.data.eval = ""
    stages.get("sft").run(c, str(work))
    return str(work)


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_rm_from_sft_workdir_learns_and_scores(sft_dir, tmp_path):
    from align_jax.data import preference
    from align_jax.eval.reward import RewardScorer
    from align_jax.losses.reward import pair_rewards
    from align_jax.models.apply import apply_fn
    from align_jax.models.heads import ScalarModel
    from align_jax.stages import rm, runner
    from align_jax.stages.pairs import data_config

    c = small("rm", steps=40)
    c.init_from = sft_dir
    c.score_weight = 0.1
    c.optim.update(lr=3e-3, warmup_steps=5)
    c.train.eval_every = 40
    work = str(tmp_path / "rm")
    summary = stages.get("rm").run(c, work)
    assert summary["init"] == "init_from_workdir" and summary["final_step"] == 40
    rows = [r for r in read_metrics(work) if "loss" in r]
    for key in ("accuracy", "margin", "reward_mean", "reward_std", "bt_loss", "score_mse"):
        assert key in rows[0] and np.isfinite(rows[-1][key])
    assert {"final_eval_accuracy", "final_eval_margin", "final_eval_reward_std"} <= set(summary)
    assert np.mean([r["loss"] for r in rows[-10:]]) < np.mean([r["loss"] for r in rows[:10]])

    # The scorer reads the same reward as training: the last target token of prompt + response.
    scorer = RewardScorer.load(work)
    run = runner.Run(rm.spec, c, str(tmp_path / "rm_again"))
    import jax

    from align_jax.checkpoint import restore_params

    params = restore_params(work, run.setup.abstract_params)
    data_cfg = dict(data_config(c), batch_size=8, seq_len=256)  # long enough that no pair is truncated
    batch = next(iter(preference.make_preference_iterator(data_cfg, run.tokenizer, split="eval")))
    rc, rr = jax.device_get(
        jax.jit(lambda p, b: pair_rewards(p, b, apply_fn=apply_fn(ScalarModel(run.model_cfg, run.sharder))))(
            params, batch
        )
    )
    with open(os.path.join(ROOT, "align_jax", "data", "demo", "pref_eval.jsonl")) as f:
        raw = [json.loads(line) for line in f]
    ids = batch["example_id"][batch["pair_mask"] > 0][:4]
    got_c = scorer.score([raw[i]["prompt"] for i in ids], [raw[i]["chosen"][0]["content"] for i in ids])
    got_r = scorer.score([raw[i]["prompt"] for i in ids], [raw[i]["rejected"][0]["content"] for i in ids])
    np.testing.assert_allclose(got_c, rc[batch["pair_mask"] > 0][:4], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_r, rr[batch["pair_mask"] > 0][:4], rtol=1e-4, atol=1e-4)


def test_dpo_precomputed_reference_equals_in_step_and_reuses_its_cache(sft_dir, tmp_path):
    cache = str(tmp_path / "cache")
    got = {}
    for mode in ("in_step", "precomputed", "precomputed"):
        c = small("dpo", steps=4)
        c.init_from = sft_dir
        c.update(reference=mode, ref_cache_dir=cache)
        c.train.eval_every = 4
        work = str(tmp_path / f"dpo_{mode}_{len(got)}")
        summary = stages.get("dpo").run(c, work)
        got[len(got)] = (losses(work), summary)
    (a, sa), (b, sb), (c2, sc) = got[0], got[1], got[2]
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
        assert c2[step] == b[step]
    assert sb["final_eval_loss"] == pytest.approx(sa["final_eval_loss"], rel=1e-5)
    assert sb["reference"] == "precomputed" and set(sb["ref_cache"]) == {"train", "eval"}
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    assert sc["ref_cache"] == sb["ref_cache"]  # the second run found the same tables
    rows = [r for r in read_metrics(str(tmp_path / "dpo_in_step_0")) if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert key in rows[0]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1


def test_dpo_resume_reloads_the_reference_and_continues_exactly(sft_dir, tmp_path):
    import shutil

    c = small("dpo", steps=4)
    c.init_from = sft_dir
    c.data.eval = ""
    c.train.ckpt_every = 2
    full = str(tmp_path / "full")
    stages.get("dpo").run(c, full)
    with open(os.path.join(full, "summary.json")) as f:
        saved = json.load(f)
    assert saved["last_checkpoint"] == 4

    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    summary = stages.get("dpo").run(c, resumed)
    assert summary["init"] == "resumed" and summary["start_step"] == 2
    want, got = losses(full), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == want[step]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo", "kto"])
def test_other_objectives_train(sft_dir, tmp_path, loss_type):
    c = small("dpo", steps=3)
    c.init_from = sft_dir
    c.data.eval = ""
    c.loss_type = loss_type
    if loss_type == "kto":
        c.data.unpaired = True
    summary = stages.get("dpo").run(c, str(tmp_path / loss_type))
    assert summary["final_step"] == 3
    rows = [r for r in read_metrics(str(tmp_path / loss_type)) if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert summary["reference"] == ("none" if loss_type in ("simpo", "orpo") else "in_step")


@pytest.mark.slow
def test_cli_chain_and_score(sft_dir, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    over = [f"--config.model.{k}={v}" for k, v in SMALL.items()]
    over += ["--config.data.seq_len=128", "--config.data.batch_size=4", "--config.train.steps=2",
             "--config.train.progress=False", f"--config.init_from={sft_dir}"]  # fmt: skip
    for stage in ("rm", "dpo"):
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
               os.path.join(ROOT, "configs", f"{stage}.py") + ":tiny", "--workdir", str(tmp_path / stage), *over]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "2 plus 3 is 6."})
        + "\n"
        + json.dumps({"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5."})
        + "\n"
    )
    cmd = [sys.executable, os.path.join(ROOT, "launch", "score.py"), "--workdir", str(tmp_path / "rm"),
           "--input", str(pairs), "--output", str(tmp_path / "scored.jsonl")]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert {"chosen_reward", "rejected_reward"} <= set(scored[0]) and "reward" in scored[1]
    assert scored[1]["reward"] == pytest.approx(scored[0]["chosen_reward"], rel=1e-5)
    assert "accuracy" in json.loads(out.stdout.strip().splitlines()[-1])


def test_hf_handoff_rm_and_dpo_from_an_hf_dir_and_dpo_export(sft_dir, tmp_path):
    """init_from an HF directory (the exported SFT model): the RM drops the LM head and adds its own; DPO
    loads it as policy and reference. A DPO workdir exports as a causal LM; an RM workdir says why not."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from export import export

    import align_jax as aj

    hf = str(tmp_path / "sft_hf")
    export(sft_dir, hf)
    for stage in ("rm", "dpo"):
        c = small(stage, steps=2)
        c.init_from = hf
        c.data.eval = ""
        summary = stages.get(stage).run(c, str(tmp_path / stage))
        assert summary["init"] == "init_from_hf" and summary["final_step"] == 2
    out = str(tmp_path / "dpo_hf")
    export(str(tmp_path / "dpo"), out)
    cfg, params = aj.load_pretrained(out, dtype="float32")
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    assert np.isfinite(np.asarray(aj.forward(cfg, params, tokens))).all()
    with pytest.raises(ValueError, match="reward model"):
        export(str(tmp_path / "rm"), str(tmp_path / "rm_hf"))

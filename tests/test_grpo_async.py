"""GRPO with rollouts sampled ahead (rollout_staleness, align_jax/sample_ahead.py) and with multi-turn
environment episodes (config.env): exactness against the synchronous run, staleness that shows, and
environment rows that train."""

from __future__ import annotations

import numpy as np

from align_jax.metrics import read_metrics
from align_jax.stages import grpo, runner
from tests.test_grpo import grpo_config, sft_dir  # noqa: F401  (sft_dir is a fixture)

STEPS = 4


def losses_and_metrics(c, work):
    r = runner.Run(grpo.spec, c, work)
    runner.drive(r)
    rows = [m for m in read_metrics(work) if "loss" in m]
    return rows, r


def test_sampling_ahead_with_frozen_params_reproduces_the_synchronous_run(sft_dir, tmp_path):  # noqa: F811
    # An update of 1e-30 rounds away in float32: the params never change, so samples drawn a step ahead
    # (another thread, a copy of the params) must equal the synchronous ones exactly: same prompts, same
    # seeds, same tokens, same losses. Staleness 0 is the synchronous code path itself.
    runs = {}
    for staleness in (0, 1, 2):
        c = grpo_config(sft_dir)
        c.update(rollout_staleness=staleness)
        c.optim.update(lr=1e-30, weight_decay=0.0, warmup_steps=0)
        c.train.steps = STEPS
        runs[staleness], _ = losses_and_metrics(c, str(tmp_path / f"s{staleness}"))
    keys = ("loss", "reward/mean", "response_length", "kl")
    for staleness in (1, 2):
        for sync, ahead in zip(runs[0], runs[staleness], strict=True):
            assert all(sync[k] == ahead[k] for k in keys), (staleness, sync, ahead)
    assert [m["rollout_age"] for m in runs[2]] == [0.0, 1.0, 2.0, 2.0]


def test_stale_rollouts_come_from_older_params_and_tis_sees_it(sft_dir, tmp_path):  # noqa: F811
    c = grpo_config(sft_dir)
    c.update(rollout_staleness=1, tis_cap=2.0)
    c.optim.update(lr=1e-2, warmup_steps=0)
    c.train.steps = STEPS
    rows, r = losses_and_metrics(c, str(tmp_path / "stale"))
    assert [m["rollout_age"] for m in rows] == [0.0] + [1.0] * (STEPS - 1)
    # The first rollout is sampled with the params it is scored with: only float error between sampler
    # and trainer. Later ones were sampled one update earlier than the trainer scores them.
    assert rows[0]["logp_mismatch/max"] < 1e-4
    assert all(m["logp_mismatch/max"] > 1e-3 for m in rows[1:])
    assert all(np.isfinite(m["loss"]) for m in rows) and any(m["tis/weight"] != 1.0 for m in rows[1:])
    # A checkpoint records the prompts of the rollouts trained on, not of the one sampled ahead.
    prompts = r.train_iter.prompts
    per_rollout = c.data.batch_size // c.group_size
    assert prompts.state()["rows"] == STEPS * per_rollout
    assert prompts.state(live=True)["rows"] == (STEPS + 1) * per_rollout


def test_environment_episodes_train_with_only_sampled_tokens_in_the_loss(sft_dir, tmp_path):  # noqa: F811
    c = grpo_config(sft_dir)
    c.update(env="calculator", env_max_turns=2, rules="", max_new_tokens=6)
    c.data.update(train="demo:calculator", eval="demo:calculator", seq_len=96)
    c.train.update(steps=2, eval_every=2)
    c.eval_prompts = 8
    rows, _ = losses_and_metrics(c, str(tmp_path / "env"))
    assert len(rows) == 2 and all(np.isfinite(m["loss"]) for m in rows)
    assert all(1.0 <= m["reward/turns"] <= 2.0 and "reward/env" in m for m in rows)
    assert all(m["logp_mismatch/max"] < 1e-4 for m in rows)  # sampler and trainer agree on multi-turn rows
    evals = [m for m in read_metrics(str(tmp_path / "env")) if "eval_reward" in m]
    assert evals and "eval_reward/env" in evals[-1]


def test_refill_engine_rollouts_train_and_agree_with_the_trainer(sft_dir, tmp_path):  # noqa: F811
    c = grpo_config(sft_dir)
    c.update(rollout_slots=8)  # 24 responses through 8 refilled decode rows
    c.train.steps = 2
    rows, _ = losses_and_metrics(c, str(tmp_path / "engine"))
    assert len(rows) == 2 and all(np.isfinite(m["loss"]) for m in rows)
    assert all(m["logp_mismatch/max"] < 1e-4 for m in rows)  # the engine's log-probs are the trainer's

"""What a user reads from the launch scripts: one `error:` line (exit 2) for their own mistakes, no
workdir left behind by a run that could not start, and one human line at the end of a run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from align_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, *flags, preset="sft.py:tiny"):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", preset), "--workdir", str(workdir), *flags]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # Before: a 53-line traceback ending in AttributeError: '\'stpes\'\nDid you mean "steps" ...'.
        (["--config.train.stpes=3"], "error: --config.train.stpes: no such config key 'stpes' Did you mean \"steps\""),
        (["--config.train.steps=abc"], "error: flag --config.train.steps=abc: invalid literal for int()"),
        # Before: a raw 28-line FileNotFoundError traceback, and an empty workdir left behind.
        (
            ["--config.data.train=/nonexistent/chats.jsonl"],
            "error: config.data.train: no such file: /nonexistent/chats.jsonl",
        ),
        (["--config.optim.warmup_steps=-1"], "error: config.optim.warmup_steps=-1 must be >= 0"),
    ],
)
def test_user_mistakes_are_one_line_and_leave_no_workdir(tmp_path, flags, message):
    out = train(tmp_path / "w", *flags)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]  # nothing but the error
    assert out.stderr.strip().startswith(message), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_a_pipeline_checks_every_stage_data_before_it_starts(tmp_path):
    out = train(tmp_path / "w", "--config.dpo.data.train=/nonexistent/pairs.jsonl", preset="pipeline.py:tiny")
    assert (
        out.returncode == 2
        and out.stderr.strip() == "error: config.dpo.data.train: no such file: /nonexistent/pairs.jsonl"
    )
    assert not (tmp_path / "w").exists()


def test_old_config_paths_still_work_with_a_deprecation_warning(tmp_path):
    out = train(tmp_path / "w", "--config.dpo.dpo.beta=-1.0", preset="pipeline.py:tiny")
    assert out.returncode == 2 and "--config.dpo.dpo.beta is deprecated" in out.stderr
    assert "use --config.dpo.beta" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: config.dpo: config.dpo.beta must be positive, got -1.0"
    assert not (tmp_path / "w").exists()


def test_verbose_brings_the_traceback_back(tmp_path):
    out = train(tmp_path / "w", "--config.data.train=/nonexistent/chats.jsonl", "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr and "NotFoundError" in out.stderr


def test_summary_lines():
    done = {"final_step": 300, "final_eval_loss": 0.52, "final_eval_tokens": 1073.0, "final_eval_accuracy": 0.82}
    assert cli.summary_line("sft", done, "/runs/sft") == (
        "sft done at step 300 (eval_loss 0.52, eval_accuracy 0.82): /runs/sft (summary.json, checkpoints/)"
    )
    assert cli.summary_line("dpo", {"final_step": 40, "preempted": True}, "/runs/dpo") == (
        "dpo preempted at step 40: checkpoint saved in /runs/dpo; rerun the same command to resume"
    )
    report = {"stages": ["sft", "eval"], "report": "/runs/demo/report/report.md"}
    assert (
        cli.summary_line("pipeline", report, "/runs/demo")
        == "pipeline done: report written to /runs/demo/report/report.md"
    )
    assert cli.summary_line("pipeline", {"preempted": "dpo"}, "/runs/demo").startswith(
        "pipeline stopped: dpo was preempted"
    )

"""A stage config holds its own keys once: shared sections + the stage's settings at its top level, so a
pipeline never repeats a stage name; the previous spellings still work for one release, with a warning."""

from __future__ import annotations

import json
import logging
import os

import pytest

from align_jax.config import base_config, validate
from align_jax.config.deprecated import new_path, rewrite_flags, upgrade_saved
from tests.test_configs import load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def test_each_stage_holds_only_its_keys():
    sft, dpo, grpo = (json.loads(base_config(s).to_json()) for s in ("sft", "dpo", "grpo"))
    assert "beta" not in sft and "group_size" not in dpo and "beta" in dpo and "group_size" in grpo
    assert "max_pairs" in dpo["data"] and "max_pairs" not in sft["data"] and "loss_on" in sft["data"]
    assert not {"rm", "dpo", "grpo", "pas", "rules"} & set(sft)  # no other stage's section, rules in mesh
    assert sft["mesh"]["rules"] == []
    pipeline = json.loads(load_preset("pipeline", "tiny").to_json())
    paths = leaves(pipeline)
    # Was ~625 keys with every stage's settings in every stage; no path repeats its stage's name.
    assert len(paths) < 450, len(paths)  # 406 with the 2025 RL variants, IFEval and env keys
    assert not [p for p in paths if len(p.split(".")) > 2 and p.split(".")[0] == p.split(".")[1]]
    assert "grpo.rm_workdir" in paths and "pas.prompts" in paths and "dpo.rpo_alpha" in paths


@pytest.mark.parametrize(
    ("stage", "old", "new"),
    [
        ("grpo", "grpo.kl_coef", "kl_coef"),
        ("dpo", "dpo.beta", "beta"),
        ("sft", "rules", "mesh.rules"),
        ("grpo", "rules", None),  # a grpo config's `rules` are its reward rules now
        ("pipeline", "grpo.rules", None),
        ("grpo", "kl_coef", None),
        ("pipeline", "grpo.grpo.rm_workdir", "grpo.rm_workdir"),
        ("pipeline", "pas.pas.prompts", "pas.prompts"),
        ("pipeline", "dpo.rules", "dpo.mesh.rules"),
        ("pipeline", "dpo.train.steps", None),
    ],
)
def test_old_paths_map_to_new(stage, old, new):
    assert new_path(old, stage) == new


def test_old_flags_are_rewritten_with_a_warning(caplog):
    grpo = os.path.join(ROOT, "configs", "grpo.py") + ":tiny"
    pipeline = os.path.join(ROOT, "configs", "pipeline.py") + ":tiny"
    with caplog.at_level(logging.WARNING):
        got = rewrite_flags(["train.py", f"--config={grpo}", "--config.grpo.kl_coef=0.1", "--config.data.seq_len=64"])
        assert got[2:] == ["--config.kl_coef=0.1", "--config.data.seq_len=64"]
        got = rewrite_flags(
            ["train.py", "--config", pipeline, "--config.pas.pas.teacher=/m", "--config.pas.teacher=/n"]
        )
        assert got[3:] == ["--config.pas.teacher=/m", "--config.pas.teacher=/n"]
    assert "--config.grpo.kl_coef is deprecated" in caplog.text and "use --config.kl_coef" in caplog.text
    assert "--config.pas.pas.teacher is deprecated" in caplog.text


def test_checkpoints_saved_with_the_old_layout_read_as_the_new():
    old = {"config": {"stage": "grpo", "rules": [], "mesh": {"data": -1}, "grpo": {"algorithm": "ppo", "kl_coef": 0.1},
                      "dpo": {"beta": 0.1}, "rm": {}, "pas": {}}, "runtime": {}}  # fmt: skip
    new = upgrade_saved(old)["config"]
    assert new["algorithm"] == "ppo" and new["kl_coef"] == 0.1 and not {"grpo", "dpo", "rm", "pas"} & set(new)
    old = {"config": {"stage": "sft", "rules": [["embed", "fsdp"]], "mesh": {"data": -1}, "dpo": {"beta": 0.1}}}
    new = upgrade_saved(old)["config"]
    assert new["mesh"]["rules"] == [["embed", "fsdp"]] and "rules" not in new and "dpo" not in new
    assert upgrade_saved(upgrade_saved(old)) == upgrade_saved(old)


def test_every_preset_validates():
    for stage in ("sft", "rm", "dpo", "grpo", "pas", "pipeline"):
        validate(load_preset(stage, "tiny"))


def test_old_flags_in_every_absl_form(caplog):
    dpo = os.path.join(ROOT, "configs", "dpo.py") + ":tiny"
    grpo = os.path.join(ROOT, "configs", "grpo.py") + ":tiny"
    with caplog.at_level(logging.WARNING):
        argv = [
            "t",
            f"--config={dpo}",
            "--config.dpo.beta",
            "0.2",
            "--config.dpo.reference_free",
            "--noconfig.dpo.reference_free",
        ]
        assert rewrite_flags(argv)[2:] == [
            "--config.beta",
            "0.2",
            "--config.reference_free",
            "--noconfig.reference_free",
        ]
        argv = ["t", f"--config={grpo}", "--config.rules=(('embed','fsdp'),)", "--config.grpo.rules=format"]
        assert rewrite_flags(argv)[2:] == ["--config.mesh.rules=(('embed','fsdp'),)", "--config.rules=format"]
    assert caplog.text.count("is deprecated") == 5


def test_pipeline_stage_records_of_the_old_layout_still_match(tmp_path):
    """A stage record written before the layout change (every stage's sections, every data key, stage
    settings in their own section) reads as this layout's: finished stages stay finished."""
    from align_jax.stages.pipeline import check_stage_record

    for stage in ("sft", "rm", "dpo", "grpo", "pas"):
        c = load_preset(stage, "tiny")
        new = json.loads(c.to_json_best_effort())
        shared = ("stage", "init_from", "tokenizer", "seed", "model", "data", "mesh", "optim", "train", "metrics")
        old = json.loads(json.dumps({k: v for k, v in new.items() if k in shared}))
        old["rules"] = old["mesh"].pop("rules")
        del old["mesh"]["expert"]  # records before the expert axis (and the lora section, not in `shared`)
        old["data"] = {**old["data"], "loss_on": "assistant", "max_pairs": 0, "unpaired": False, **new["data"]}
        for other in ("rm", "dpo", "grpo", "pas"):
            old[other] = {k: v for k, v in new.items() if k not in shared} if other == stage else {"x": 1}
        for key in ("steps", "progress", "log_every", "eval_every", "ckpt_every", "async_checkpoint"):
            old["train"].pop(key, None)
        work = tmp_path / stage
        work.mkdir()
        (work / "pipeline_stage.json").write_text(json.dumps({"settings": old, "inputs": {}}))
        check_stage_record(stage, c, str(work), [])  # no ResumeMismatchError

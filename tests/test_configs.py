"""Every preset of every config file builds and validates."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from align_jax.config import ConfigValueError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")


def load_preset(stage: str, preset: str):
    spec = importlib.util.spec_from_file_location(f"configs_{stage}", os.path.join(CONFIG_DIR, f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def presets(stage: str) -> list[str]:
    """The presets a config file documents in its docstring (lines of the form `  name   text`)."""
    spec = importlib.util.spec_from_file_location(f"doc_{stage}", os.path.join(CONFIG_DIR, f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.__doc__.split("Presets:")[1]
    return re.findall(r"^  (\w+) ", doc, flags=re.M)


STAGES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
CASES = [(s, p) for s in STAGES for p in presets(s)]


@pytest.mark.parametrize(("stage", "preset"), CASES, ids=[f"{s}:{p}" for s, p in CASES])
def test_preset_builds_and_validates(stage, preset):
    config = load_preset(stage, preset)
    validate(config)
    assert config.is_locked


def test_sft_has_its_presets():
    assert set(presets("sft")) >= {
        "tiny",
        "small30m",
        "llama1b",
        "llama3_8b",
        "qwen2_7b",
        "llama3_70b",
        "qwen3_8b",
        "gemma3_12b",
        "qwen3_30b_a3b",
    }


def test_unknown_key_and_bad_value_fail_early():
    config = load_preset("sft", "tiny")
    with pytest.raises(AttributeError):
        config.train.stpes = 10  # locked: a typo is an error, not a new key
    config.data.batch_size = 6
    config.train.microbatches = 4
    with pytest.raises(ConfigValueError, match=r"batch_size=6 is not divisible by config.train.microbatches=4"):
        validate(config)
    config.train.microbatches = 1
    config.model.remat_policy = "sometimes"
    with pytest.raises(ConfigValueError, match=r"model\.remat_policy='sometimes'"):
        validate(config)
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        load_preset("sft", "huge")


def test_batch_that_the_mesh_cannot_split_fails_early():
    from align_jax.stages.build import make_sharder

    config = load_preset("sft", "tiny")  # mesh data=-1: all 8 test devices on the batch
    config.unlock()
    config.data.batch_size = 12
    with pytest.raises(
        ValueError, match=r"12 rows each, which the batch axes \('data', 'fsdp', 'expert'\) \(8 devices"
    ):
        make_sharder(config)
    config.data.batch_size, config.train.microbatches = 16, 2
    assert make_sharder(config).mesh.shape["data"] == 8


def test_preference_formats_match_the_loader():
    from align_jax.config import PREFERENCE_FORMATS
    from align_jax.data.preference_formats import PREF_FORMATS

    assert PREFERENCE_FORMATS == PREF_FORMATS


def test_dpo_config_rules():
    config = load_preset("dpo", "tiny")
    config.unlock()
    config.loss_type = "kto"
    with pytest.raises(ConfigValueError, match="unpaired"):
        validate(config)
    config.data.unpaired = True
    validate(config)
    config.loss_type = "dpo_typo"
    with pytest.raises(ConfigValueError, match=r"config\.loss_type"):
        validate(config)

"""The run config, assembled from typed sections and filled in by `configs/<stage>.py` presets.

`base_config(stage)` returns a `ml_collections.ConfigDict` holding the keys that stage reads, with
defaults: the run's fields (stage, init_from, tokenizer, seed), the shared sections
(config/sections.py: model, data, mesh, optim, train, metrics, lora) and the stage's own settings at the top
level (config/stage_sections.py: `config.beta` in a dpo config). Presets change values, and
`--config.x=y` on the command line can only set keys that exist (a typo fails at once, naming the key;
paths of the previous layout are rewritten with a deprecation warning, config/deprecated.py).
`validate` then checks values and cross-field rules before anything is built, so a bad config fails in
a second, not after compilation. Each section's checks live beside its defaults.
"""

from __future__ import annotations

import os

import ml_collections

from align_jax.config.sections import (
    DATA_FORMATS,
    PREFERENCE_FORMATS,
    SECTIONS,
    ConfigValueError,
    one_of,
    positive,
)
from align_jax.config.stage_sections import STAGE_SECTIONS
from align_jax.workdir import DEMO_DIR, EVAL_DATA_DIR, resolve_data_path

__all__ = [
    "DATA_FORMATS",
    "DEMO_DIR",
    "EVAL_DATA_DIR",
    "MERGE_METHODS",
    "PIPELINE_STAGES",
    "PREFERENCE_FORMATS",
    "STAGES",
    "ConfigValueError",
    "base_config",
    "resolve_data_path",
    "validate",
    "validate_pipeline",
]

STAGES = ("sft", "rm", "dpo", "grpo", "pas", "pipeline")
PIPELINE_STAGES = ("sft", "pas", "rm", "dpo", "grpo", "merge", "eval")
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock")


def base_config(stage: str) -> ml_collections.ConfigDict:
    """A training stage's config with every default."""
    if stage not in STAGE_SECTIONS:
        raise ConfigValueError(f"no training stage {stage!r}; stages: {', '.join(STAGE_SECTIONS)}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    # Params-only init: an HF directory or a previous stage's workdir (DESIGN.md, init precedence).
    c.init_from = ""
    # "" = the tokenizer of init_from; "demo" = train a small BPE on the training data; else a path.
    c.tokenizer = ""
    c.seed = 0
    for name, (make, _) in SECTIONS.items():
        c[name] = make(stage) if name == "data" else make()
    own, _ = STAGE_SECTIONS[stage]
    if own is not None:
        for key, value in own().items():
            c[key] = value
    return c


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks values and cross-field rules; returns the config for chaining."""
    one_of(c.stage, STAGES, "stage")
    if c.stage == "pipeline":
        return validate_pipeline(c)
    for _, check in SECTIONS.values():
        if check is not None:
            check(c)
    _, check = STAGE_SECTIONS[c.stage]
    if check is not None:
        check(c)
    return c


def validate_pipeline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A pipeline config (configs/pipeline.py): the stage list, each training stage's own config, the
    merge recipe. Everything a later stage needs is checked before the first one starts."""
    names = [s.strip() for s in str(c.stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in PIPELINE_STAGES]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigValueError(
            f"config.stages={c.stages!r}: each stage at most once, from {PIPELINE_STAGES} (unknown: {unknown})"
        )
    for name in names:
        if name in ("merge", "eval"):
            continue
        if c[name].stage != name:
            raise ConfigValueError(
                f"config.{name}.stage={c[name].stage!r}: the {name} settings must be a {name} config"
            )
        try:
            validate(c[name])
        except ConfigValueError as e:
            # The stage's keys as the pipeline spells them: config.dpo.beta, not config.beta.
            raise ConfigValueError(f"config.{name}: {str(e).replace('config.', f'config.{name}.')}") from None
    if "merge" in names:
        one_of(c.merge.method, MERGE_METHODS, "merge.method")
        if not 0.0 <= c.merge.t <= 1.0 or not 0.0 < c.merge.density <= 1.0 or not 0.0 <= c.merge.drop_rate < 1.0:
            raise ConfigValueError(
                f"config.merge: need 0 <= t <= 1, 0 < density <= 1, 0 <= drop_rate < 1; got "
                f"{c.merge.t}, {c.merge.density}, {c.merge.drop_rate}"
            )
    if "eval" in names:
        positive(c, "eval.max_new_tokens", "eval.seq_len", "eval.batch_size")
        one_of(c.eval.dtype, ("float32", "bfloat16"), "eval.dtype")
        _validate_ifeval(c)
    return c


def _validate_ifeval(c: ml_collections.ConfigDict) -> None:
    """config.eval.ifeval (optional: configs may predate it) names a file that exists, checked now rather
    than when the eval stage reaches it after every training stage."""
    if "ifeval_max_new_tokens" in c.eval:
        positive(c, "eval.ifeval_max_new_tokens")
    path = c.eval.get("ifeval", "")
    if path and path != "demo" and not os.path.isfile(resolve_data_path(path)):
        raise ConfigValueError(f"config.eval.ifeval={path!r}: no such file (an IFEval JSONL file, or 'demo')")

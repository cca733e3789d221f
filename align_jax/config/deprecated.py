"""Config paths of the previous layout, accepted for one release with a deprecation warning.

Until this release a stage's own settings sat in a section named after the stage, so a pipeline
repeated it (`--config.grpo.grpo.kl_coef`), and the sharding rules were a top-level `rules`. Now a
stage's own settings are the top level of its config (`--config.kl_coef` for a grpo run,
`--config.grpo.kl_coef` in a pipeline) and the rules are `mesh.rules`. `rewrite_flags` rewrites old
command-line paths (warning once per path); `upgrade_saved` reads a checkpoint's saved config of the old
layout as the new one, so runs saved before the change still resume.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
from typing import Any

from align_jax.config.sections import data_section, lora_section
from align_jax.config.stage_sections import STAGE_SECTIONS

log = logging.getLogger(__name__)

OWN_SECTION_STAGES = tuple(s for s, (own, _) in STAGE_SECTIONS.items() if own is not None)  # rm dpo grpo pas


def _looks_like_mesh_rules(value: str | None) -> bool:
    return value is not None and value.strip()[:1] in ("(", "[")


def new_path(path: str, stage: str, value: str | None = None) -> str | None:
    """The current spelling of a `--config.` path of a `stage` config (or pipeline), or None if current.
    A grpo config's `rules` are its reward rules now; a value shaped like sharding rules (a tuple of
    pairs) still means the old top-level sharding `rules`."""
    parts = path.split(".")
    if stage == "pipeline":
        if len(parts) >= 3 and parts[0] == parts[1] and parts[0] in OWN_SECTION_STAGES:
            return ".".join(parts[:1] + parts[2:])  # grpo.grpo.kl_coef -> grpo.kl_coef
        old_rules = parts[0] != "grpo" or _looks_like_mesh_rules(value)
        if len(parts) == 2 and parts[1] == "rules" and parts[0] in STAGE_SECTIONS and old_rules:
            return f"{parts[0]}.mesh.rules"
        return None
    if len(parts) >= 2 and parts[0] == stage and stage in OWN_SECTION_STAGES:
        return ".".join(parts[1:])  # grpo.kl_coef -> kl_coef
    if parts == ["rules"] and (stage != "grpo" or _looks_like_mesh_rules(value)):
        return "mesh.rules"
    return None


def config_stage(spec: str) -> str | None:
    """The `stage` of a `--config=FILE[:ARG]` config file (None when it cannot be read here: absl then
    reports the file's own error)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return None
    try:
        module_spec = importlib.util.spec_from_file_location("align_jax_config_probe", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
        return str(config.stage)
    except Exception:  # any failure here is absl's to report, with its context
        return None


def rewrite_flags(argv: list[str]) -> list[str]:
    """argv with deprecated `--config.` paths rewritten to the current ones, each with a warning."""
    if not any(_OVERRIDE.match(arg) for arg in argv):
        return argv  # nothing to rewrite: the config file is not read an extra time
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    stage = config_stage(spec) if spec else None
    if stage is None:
        return argv
    out = []
    for i, arg in enumerate(argv):
        # absl's forms: --config.k=v, --config.k v, -config.k=v, and booleans --config.k / --noconfig.k.
        m = _OVERRIDE.match(arg)
        if m:
            value = m["value"][1:] if m["value"] else (argv[i + 1] if i + 1 < len(argv) else None)
            new = new_path(m["key"], stage, value)
            if new is not None:
                log.warning(
                    "--config.%s is deprecated (this spelling goes in the next release); use --config.%s",
                    m["key"],
                    new,
                )
                arg = f"{m['dashes']}{m['no'] or ''}config.{new}{m['value'] or ''}"
        out.append(arg)
    return out


_OVERRIDE = re.compile(r"^(?P<dashes>-{1,2})(?P<no>no)?config\.(?P<key>[^=]+)(?P<value>=.*)?$", re.S)


def _added_since(saved: dict) -> dict:
    """Settings that did not exist when a run was saved read as what such a run did: no LoRA (`lora`
    section absent) and no expert mesh axis (`mesh.expert` absent)."""
    config = saved["config"]
    stage = config.get("stage")
    missing_lora = stage in STAGE_SECTIONS and "lora" not in config
    missing_expert = isinstance(config.get("mesh"), dict) and "expert" not in config["mesh"]
    if not (missing_lora or missing_expert):
        return saved
    saved = copy.deepcopy(saved)
    config = saved["config"]
    if missing_lora:
        config["lora"] = json.loads(lora_section().to_json_best_effort())
    if missing_expert:
        config["mesh"]["expert"] = 1
    return saved


def upgrade_saved(saved: dict) -> dict:
    """A checkpoint's saved {config, ...} of the previous layout, in the current one: the stage's own
    section lifted to the top level, every other stage's section dropped (the old layout gave every stage
    all of them), the sharding rules moved into mesh."""
    config = saved.get("config")
    if not isinstance(config, dict):
        return saved
    saved = _added_since(saved)
    config = saved["config"]
    stage = config.get("stage")
    sections = [s for s in OWN_SECTION_STAGES if isinstance(config.get(s), dict)]
    old_rules = "rules" in config and not isinstance(config.get("rules"), str)  # grpo's reward rules are a str
    if not sections and not old_rules:
        return saved
    saved = copy.deepcopy(saved)
    config = saved["config"]
    own = config.get(stage) if stage in sections else None
    for name in sections:
        config.pop(name)
    if old_rules:
        config.setdefault("mesh", {})["rules"] = config.pop("rules")
    config.update(own or {})
    if stage in STAGE_SECTIONS and isinstance(config.get("data"), dict):
        # The old data section held every stage's data keys; the stage's own section holds its keys only.
        keep = set(data_section(stage).keys())
        config["data"] = {k: v for k, v in config["data"].items() if k in keep}
    return saved


def upgrade_any(saved: Any) -> Any:
    return upgrade_saved(saved) if isinstance(saved, dict) else saved

"""The whole pipeline as one resumable run: each named stage in WORKDIR/<stage>, in order.

    python launch/train.py --config configs/pipeline.py:tiny --workdir runs/demo

`config.stages` names the stages to run, in order, from: sft, pas, rm, dpo, grpo, merge, eval. Each
training stage's settings are a whole stage config under its name (`config.sft`, `config.rm`, ...;
override any key on the command line, e.g. `--config.dpo.train.steps=300`). A value of the form
`stage:NAME` in `init_from`, `grpo.rm_workdir`, `grpo.augment`, the merge sources or the eval settings
names another stage's workdir, WORKDIR/NAME. `config.init_from` is the base model (an HF directory;
empty = the SFT stage trains from scratch).

Resuming: a stage whose summary says it reached its configured step count is skipped; one that stopped
part-way (preemption, a crash) resumes from its own latest checkpoint; the merge and eval stages keep
their results keyed by what produced them and redo only what changed.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import ml_collections

from align_jax import stages as stage_modules
from align_jax.config import PIPELINE_STAGES, validate
from align_jax.stages import runner

log = logging.getLogger(__name__)

TRAINING_STAGES = ("sft", "pas", "rm", "dpo", "grpo")
REF = "stage:"


def stage_list(config: ml_collections.ConfigDict) -> list[str]:
    names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in PIPELINE_STAGES]
    if unknown or not names:
        raise ValueError(f"config.stages={config.stages!r}: unknown {unknown}; choose from {PIPELINE_STAGES}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.stages={config.stages!r} names a stage twice")
    return names


class Resolver:
    """Turns `stage:NAME` into WORKDIR/NAME, checking that NAME runs before the stage that refers to it."""

    def __init__(self, workdir: str, order: list[str]):
        self.workdir, self.order = os.path.abspath(workdir), order

    def __call__(self, value: str, *, by: str, key: str) -> str:
        value = str(value)
        if not value.startswith(REF):
            return value
        name = value[len(REF) :]
        if name not in self.order or self.order.index(name) >= self.order.index(by):
            raise ValueError(
                f"config.{by}.{key}={value!r}: stage {name!r} must run before {by!r} (stages: {','.join(self.order)})"
            )
        return os.path.join(self.workdir, name)

    def many(self, values: str, *, by: str, key: str) -> list[str]:
        return [self(v.strip(), by=by, key=key) for v in str(values).split(",") if v.strip()]


def is_complete(workdir: str, steps: int) -> bool:
    summary = runner.read_summary(workdir)
    return bool(summary) and not summary.get("preempted") and int(summary.get("final_step", -1)) >= steps


def stage_config(config: ml_collections.ConfigDict, name: str, resolve: Resolver) -> ml_collections.ConfigDict:
    """The stage's own config, with `stage:` references resolved (a copy: the pipeline config is locked)."""
    c = copy.deepcopy(config[name])
    with c.unlocked():
        init_from = c.init_from or (config.init_from if name == "sft" else "")
        c.init_from = resolve(init_from, by=name, key="init_from")
        if name == "grpo":
            c.grpo.rm_workdir = resolve(c.grpo.rm_workdir, by=name, key="grpo.rm_workdir")
            if str(c.grpo.augment).startswith(REF):
                c.grpo.augment = "pas:" + resolve(c.grpo.augment, by=name, key="grpo.augment")
        if name == "pas":
            for key in ("embedder", "teacher", "judge", "quality", "tagger"):
                c.pas[key] = resolve(c.pas[key], by=name, key=f"pas.{key}")
    return c


def run_training_stage(name: str, c: ml_collections.ConfigDict, workdir: str) -> dict:
    if is_complete(workdir, int(c.train.steps)):
        log.info("pipeline: %s is complete in %s; skipped", name, workdir)
        return {**runner.read_summary(workdir), "skipped": True}
    log.info("pipeline: running %s in %s", name, workdir)
    return stage_modules.get(c.stage).run(c, workdir)


def run_merge(config: ml_collections.ConfigDict, resolve: Resolver, workdir: str) -> dict:
    from align_jax.merge import NEEDS_BASE, merge_checkpoints

    m = config.merge
    kwargs: dict[str, Any] = {}
    if m.method == "slerp":
        kwargs["t"] = float(m.t)
    if m.method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        kwargs["scale"] = float(m.scale)
    if m.method == "ties":
        kwargs["density"] = float(m.density)
    if m.method in ("dare_linear", "dare_ties"):
        kwargs.update(drop_rate=float(m.drop_rate), seed=int(m.seed))
    weights = [float(w) for w in str(m.weights).split(",") if w.strip()] or None
    # linear and slerp merge the listed models only; the anchor is for the task-vector methods.
    base = resolve(m.base, by="merge", key="base") if m.method in NEEDS_BASE else None
    models = resolve.many(m.models, by="merge", key="models")
    # The merge's own skip rule compares recipes, which name paths, not checkpoints: when a source has
    # trained further since (a longer run, a resumed stage), the stored merge is stale and is redone.
    done = runner.read_summary(workdir) or {}
    steps = {os.path.abspath(p): checkpoint_step(p) for p in [*models, *([base] if base else [])]}
    stale = bool(done) and {os.path.abspath(k): v for k, v in done.get("source_steps", {}).items()} != steps
    return merge_checkpoints(m.method, models, workdir, base=base, weights=weights, overwrite=stale, **kwargs)


def checkpoint_step(workdir: str) -> int | None:
    """A stage workdir's latest checkpoint step from its directory names (None for an HF directory)."""
    from align_jax.checkpoint import checkpoint_dir

    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    order = stage_list(config)
    resolve = Resolver(workdir, order)
    os.makedirs(workdir, exist_ok=True)
    summaries: dict[str, dict] = {}
    for name in order:
        where = os.path.join(os.path.abspath(workdir), name)
        if name in TRAINING_STAGES:
            summaries[name] = run_training_stage(name, stage_config(config, name, resolve), where)
        elif name == "merge":
            summaries[name] = run_merge(config, resolve, where)
        else:
            from align_jax.stages import evaluation

            summaries[name] = evaluation.run_pipeline_eval(config, resolve, where, order)
        log.info("pipeline: %s done", name)
    out = {"stages": order, "workdir": os.path.abspath(workdir)}
    if "eval" in summaries:
        out["report"] = summaries["eval"].get("report")
        out["metrics"] = summaries["eval"].get("metrics")
    runner.write_summary(workdir, {**out, "stage_summaries": summaries})
    return out

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
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from align_jax import stages as stage_modules
from align_jax import workdir as workdir_files
from align_jax.checkpoint import ResumeMismatchError
from align_jax.config import PIPELINE_STAGES, ConfigValueError
from align_jax.config.deprecated import upgrade_saved
from align_jax.stages import runner
from align_jax.workdir import config_diff, fingerprint

log = logging.getLogger(__name__)

TRAINING_STAGES = ("sft", "pas", "rm", "dpo", "grpo")
REF = "stage:"


def stage_list(config: ml_collections.ConfigDict) -> list[str]:
    names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in PIPELINE_STAGES]
    if unknown or not names:
        raise ConfigValueError(f"config.stages={config.stages!r}: unknown {unknown}; choose from {PIPELINE_STAGES}")
    if len(set(names)) != len(names):
        raise ConfigValueError(f"config.stages={config.stages!r} names a stage twice")
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
            raise ConfigValueError(
                f"config.{by}.{key}={value!r}: stage {name!r} must run before {by!r} (stages: {','.join(self.order)})"
            )
        return os.path.join(self.workdir, name)

    def many(self, values: str, *, by: str, key: str) -> list[str]:
        return [self(v.strip(), by=by, key=key) for v in str(values).split(",") if v.strip()]


def is_complete(workdir: str, steps: int) -> bool:
    summary = workdir_files.read_summary(workdir)
    return bool(summary) and not summary.get("preempted") and int(summary.get("final_step", -1)) >= steps


STAGE_RECORD = "pipeline_stage.json"


def check_stage_record(name: str, c: ml_collections.ConfigDict, workdir: str, inputs: list[str]) -> None:
    """A stage's workdir remembers the settings (all but train.steps, which may grow: the stage then
    resumes) and the inputs it was trained from. Reusing the workdir with other settings, or after an
    input stage changed, would silently keep or extend a model that no longer matches the config, so it
    is an error that says what differs."""
    settings = json.loads(c.to_json_best_effort())
    settings.get("train", {}).pop("steps", None)
    for key in ("progress", "log_every", "eval_every", "ckpt_every", "async_checkpoint"):
        settings.get("train", {}).pop(key, None)  # how a run reports, not what it trains
    record = {"settings": settings, "inputs": {p: fingerprint(p) for p in inputs}}
    path = os.path.join(workdir, STAGE_RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        # A record written before the config layout changed reads as the current layout.
        old["settings"] = upgrade_saved({"config": old.get("settings", {})})["config"]
        if old != json.loads(json.dumps(record)):
            changed = config_diff(old.get("settings", {}), record["settings"], prefix=f"{name}.")
            inputs_changed = [k for k, v in record["inputs"].items() if old.get("inputs", {}).get(k) != v]
            raise ResumeMismatchError(
                f"pipeline: {workdir} was trained with other settings or inputs (settings: {changed or 'same'}; "
                f"changed inputs: {inputs_changed or 'none'}); delete it to retrain the {name} stage, or use "
                "another --workdir"
            )
        return
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)


def stage_config(config: ml_collections.ConfigDict, name: str, resolve: Resolver) -> ml_collections.ConfigDict:
    """The stage's own config, with `stage:` references resolved (a copy: the pipeline config is locked)."""
    c = copy.deepcopy(config[name])
    with c.unlocked():
        init_from = c.init_from or (config.init_from if name == "sft" else "")
        c.init_from = resolve(init_from, by=name, key="init_from")
        if name == "grpo":
            c.rm_workdir = resolve(c.rm_workdir, by=name, key="rm_workdir")
            if str(c.augment).startswith(REF):
                c.augment = "pas:" + resolve(c.augment, by=name, key="augment")
        if name == "pas":
            for key in ("embedder", "teacher", "judge", "quality", "tagger"):
                c[key] = resolve(c[key], by=name, key=key)
    return c


def stage_inputs(name: str, c: ml_collections.ConfigDict) -> list[str]:
    """The workdirs (or HF directories) a training stage's result depends on."""
    paths = [c.init_from]
    if name == "grpo":
        paths += [c.rm_workdir, c.augment[len("pas:") :] if c.augment.startswith("pas:") else ""]
    if name == "pas":
        paths += [c[k] for k in ("embedder", "teacher", "judge", "quality", "tagger")]
    return sorted({p for p in paths if p and os.path.isabs(p)})


def run_training_stage(name: str, c: ml_collections.ConfigDict, workdir: str) -> dict:
    check_stage_record(name, c, workdir, stage_inputs(name, c))
    if is_complete(workdir, int(c.train.steps)):
        log.info("pipeline: %s is complete in %s; skipped", name, workdir)
        return {**workdir_files.read_summary(workdir), "skipped": True}
    log.info("pipeline: running %s in %s", name, workdir)
    return stage_modules.get(c.stage).run(c, workdir)


def run_merge(config: ml_collections.ConfigDict, resolve: Resolver, workdir: str) -> dict:
    from align_jax.merge import NEEDS_BASE, merge_checkpoints
    from align_jax.merge.checkpoints import recipe_of

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
    # The merge's own skip rule compares recipes, which name paths, not what is in them: when a source
    # has changed since (trained further, resumed) or the recipe changed, the stored merge is redone.
    inputs = {p: fingerprint(p) for p in [*models, *([base] if base else [])]}
    record = os.path.join(workdir, STAGE_RECORD)
    done = workdir_files.read_summary(workdir)
    stale = False
    if done is not None:
        old = None
        if os.path.isfile(record):
            with open(record) as f:
                old = json.load(f)
        recipe = recipe_of(m.method, models, base, weights, kwargs)
        stale = old != json.loads(json.dumps({"inputs": inputs})) or done.get("recipe") != recipe
    out = merge_checkpoints(m.method, models, workdir, base=base, weights=weights, overwrite=stale, **kwargs)
    with open(record + ".tmp", "w") as f:
        json.dump({"inputs": inputs}, f)
    os.replace(record + ".tmp", record)
    return out


def check_references(config: ml_collections.ConfigDict, order: list[str], resolve: Resolver) -> None:
    """Every `stage:` reference of every stage resolved before the first one trains: a typo in the
    eval settings should not surface after an hour of training."""
    for name in order:
        if name in TRAINING_STAGES:
            stage_config(config, name, resolve)
    if "merge" in order:
        resolve.many(config.merge.models, by="merge", key="models")
        resolve(config.merge.base, by="merge", key="base")
    if "eval" in order:
        e = config.eval
        for key in ("rm", "pas"):
            resolve(e[key], by="eval", key=key)
        missing = [n.strip() for n in str(e.models).split(",") if n.strip() not in ("", "base", *order)]
        if missing:
            raise ConfigValueError(
                f"config.eval.models names {missing}, which are not in config.stages={config.stages!r}"
            )


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Everything that can be checked before the pipeline takes its workdir: the stage list, and every
    `stage:` reference of every stage."""
    order = stage_list(config)
    if jax.process_count() > 1 and set(order) - {"sft", "rm", "dpo", "grpo"}:
        # Merge, eval and PAS curation read and write whole files on one host.
        raise ConfigValueError(
            f"config.stages={config.stages!r}: with {jax.process_count()} processes run only the training "
            "stages (sft, rm, dpo, grpo); run pas, merge and eval on one host"
        )
    check_references(config, order, Resolver(workdir, order))


@runner.locked(check=check)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    order = stage_list(config)
    resolve = Resolver(workdir, order)
    os.makedirs(workdir, exist_ok=True)
    summaries: dict[str, dict] = {}
    # Wall time of each stage (the README's times come from here); a rerun keeps a skipped stage's.
    out: dict[str, Any] = {"stages": order, "workdir": os.path.abspath(workdir), "seconds": {}}
    previous = (workdir_files.read_summary(workdir) or {}).get("seconds", {})
    for i, name in enumerate(order, start=1):
        log.info("pipeline: stage %d/%d: %s", i, len(order), name)
        t0 = time.perf_counter()
        where = os.path.join(os.path.abspath(workdir), name)
        if name in TRAINING_STAGES:
            summaries[name] = run_training_stage(name, stage_config(config, name, resolve), where)
            if summaries[name].get("preempted"):
                # Preempted (SIGTERM): the stage saved its checkpoint; the next run resumes it. Later stages
                # must not start from a half-trained model.
                log.warning("pipeline: %s was preempted; stopping (rerun to resume)", name)
                out["preempted"] = name
                break
        elif name == "merge":
            summaries[name] = run_merge(config, resolve, where)
        else:
            from align_jax.stages import evaluation

            summaries[name] = evaluation.run_pipeline_eval(config, resolve, where, order)
        took = round(time.perf_counter() - t0, 1)
        log.info("pipeline: %s done in %.0f s", name, took)
        # A stage found finished keeps the time of the run that did its work.
        skipped = summaries[name].get("skipped") and name in previous
        out["seconds"][name] = previous[name] if skipped else took
    out["seconds"]["total"] = round(sum(out["seconds"].values()), 1)
    if "eval" in summaries:
        out["report"] = summaries["eval"].get("report")
        out["metrics"] = summaries["eval"].get("metrics")
    if jax.process_index() == 0:
        workdir_files.write_summary(workdir, {**out, "stage_summaries": summaries})
    return out

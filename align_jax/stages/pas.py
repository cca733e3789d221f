"""The pas stage: curated prompts -> judged complements -> a PAS model trained with the SFT machinery.

    python launch/train.py --config configs/pas.py:tiny --workdir DIR --config.init_from=SFT_WORKDIR

1. Curation (align_jax.pas.curate): read config.prompts, embed, drop near-duplicates, cluster and
   keep the prompts nearest each centroid, optionally score quality, tag categories, cap each category.
2. Complements (align_jax.pas.complement): the teacher writes one per prompt (few-shot per category),
   the judge marks each valid or invalid with a reason, invalid ones are regenerated up to
   max_attempts times. DIR/pas_data/complements.jsonl holds every row (prompt, complement, category,
   verdict, reason, attempts); curation.json the counts of each curation step.
3. Training: the valid rows as (PAS system prompt, user prompt -> complement) chats, split into
   DIR/pas_data/{train,eval}.jsonl, trained by the SFT stage's code in DIR (checkpoints, metrics,
   resume as any stage). `align_jax.pas.Augmenter.load(DIR)` then augments prompts.

Steps 1-2 are done once: their outputs are kept under a key of the settings that made them, so a
resumed or repeated run goes straight to training.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from align_jax import workdir as workdir_files
from align_jax.checkpoint import checkpoint_dir
from align_jax.config import ConfigValueError
from align_jax.stages import runner
from align_jax.workdir import resolve_data_path

log = logging.getLogger(__name__)

DATA_DIR = "pas_data"
RECIPE_KEYS = (
    "prompts", "max_prompts", "embedder", "dedup_threshold", "n_clusters", "per_cluster", "select", "quality",
    "quality_kind", "min_quality", "tagger", "categories", "balance_cap", "teacher", "judge", "max_attempts",
    "few_shot", "flaw_rate", "max_new_tokens", "eval_fraction",
)  # fmt: skip


def _model(path: str):
    from align_jax.chat import ChatModel

    return ChatModel.load(path)


def _tagger(p: ml_collections.ConfigDict, embedder: Any):
    from align_jax import pas

    categories = [c.strip() for c in str(p.categories).split(",") if c.strip()] or list(pas.DEMO_CATEGORIES)
    if p.tagger == "demo":
        return pas.DemoRuleTagger()
    if p.tagger == "centroid":
        missing = [c for c in categories if c not in pas.DEMO_TAG_EXAMPLES]
        if missing:
            raise ValueError(f"config.tagger='centroid' has no example prompts for categories {missing}")
        return pas.CentroidTagger(embedder, {c: pas.DEMO_TAG_EXAMPLES[c] for c in categories})
    return pas.TeacherTagger(_model(p.tagger), categories)


def _quality(p: ml_collections.ConfigDict):
    from align_jax import pas

    if not p.quality:
        return None
    if p.quality_kind == "rm":
        return pas.RewardQuality.load(p.quality)
    return pas.JudgeQuality(_model(p.quality))


def make_complements(config: ml_collections.ConfigDict, out_dir: str) -> dict:
    """Steps 1 and 2; returns the summary (counts, seconds, verdicts). Reuses finished outputs."""
    from align_jax import pas

    p = config
    recipe = {k: p[k] for k in RECIPE_KEYS} | {"seed": int(config.seed)}
    done = os.path.join(out_dir, "curation.json")
    if os.path.isfile(done):
        with open(done) as f:
            saved = json.load(f)
        if saved.get("recipe") == recipe:
            log.info("pas: complements in %s are up to date; reused", out_dir)
            return saved
        if os.path.isdir(checkpoint_dir(os.path.dirname(out_dir))):
            # The PAS model's checkpoint and data position belong to the old complements.
            changed = sorted(k for k in recipe if saved.get("recipe", {}).get(k) != recipe[k])
            raise ValueError(
                f"pas: {os.path.dirname(out_dir)} has a PAS model trained on complements made with other "
                f"settings ({changed}); delete the workdir to redo them"
            )
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    prompts = pas.read_prompts(resolve_data_path(p.prompts))
    if p.max_prompts:
        prompts = prompts[: int(p.max_prompts)]
    embedder = pas.load_embedder(p.embedder)
    cur = pas.curate(
        prompts,
        embedder=embedder,
        dedup_threshold=float(p.dedup_threshold),
        n_clusters=[int(k) for k in str(p.n_clusters).split(",")],
        per_cluster=int(p.per_cluster) or None,
        select=p.select,
        quality=_quality(p),
        min_quality=float(p.min_quality) if p.quality else None,
        tagger=_tagger(p, embedder),
        balance_cap=int(p.balance_cap) or None,
        seed=int(config.seed),
        progress=bool(config.train.progress),
    )
    log.info("pas: curation kept %s", cur.counts)
    teacher = pas.TemplateTeacher(flaw_rate=float(p.flaw_rate)) if p.teacher == "template" else _model(p.teacher)
    judge = pas.RuleJudge() if p.judge == "rule" else pas.ModelJudge(_model(p.judge))
    t1 = time.perf_counter()
    rows = pas.generate_complements(
        cur.rows,
        teacher,
        judge,
        max_attempts=int(p.max_attempts),
        few_shot=int(p.few_shot),
        seed=int(config.seed),
        max_new_tokens=int(p.max_new_tokens),
    )
    pas.write_jsonl(os.path.join(out_dir, "complements.jsonl"), rows)
    chats = pas.sft_rows(rows)
    if not chats:
        raise ValueError("pas: no valid complement to train on; see complements.jsonl for the judge's reasons")
    order = np.random.default_rng(int(config.seed)).permutation(len(chats))
    n_eval = round(len(chats) * float(p.eval_fraction))
    pas.write_jsonl(os.path.join(out_dir, "eval.jsonl"), [chats[i] for i in order[:n_eval]])
    pas.write_jsonl(os.path.join(out_dir, "train.jsonl"), [chats[i] for i in order[n_eval:]])
    summary = {
        "recipe": recipe,
        "counts": cur.counts,
        "curation_seconds": round(t1 - t0, 2),
        "complement_seconds": round(time.perf_counter() - t1, 2),
        "complements": pas.summarize(rows),
        "train_rows": len(chats) - n_eval,
        "eval_rows": n_eval,
    }
    with open(done + ".tmp", "w") as f:  # written last: its presence means steps 1-2 finished
        json.dump(summary, f, indent=2)
    os.replace(done + ".tmp", done)
    return summary


def _check(config: ml_collections.ConfigDict, workdir: str) -> None:
    if not config.init_from:
        raise ConfigValueError(
            "config.init_from is empty: the pas stage trains the PAS model from it (an SFT workdir or HF directory)"
        )


@runner.locked(check=_check)  # before the run takes its workdir
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    data_dir = os.path.join(workdir, DATA_DIR)
    made = make_complements(config, data_dir)
    c = copy.deepcopy(config)
    with c.unlocked():
        c.data.train = os.path.join(data_dir, "train.jsonl")
        c.data.eval = os.path.join(data_dir, "eval.jsonl") if made["eval_rows"] else ""
        c.data.format = "messages"
    from align_jax.stages import sft

    summary = sft.run(c, workdir)
    summary["pas"] = {k: v for k, v in made.items() if k != "recipe"}
    workdir_files.write_summary(workdir, summary)
    return summary

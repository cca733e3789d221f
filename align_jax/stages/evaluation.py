"""The pipeline's eval stage: every model the pipeline made, measured the same way, and a report.

For each name in `config.eval.models` ("base" = the SFT stage's starting weights: config.init_from, or
the seeded scratch init the SFT stage began from; any other name = that stage's workdir) it measures,
through `align_jax.eval.suite.evaluate_model`: constraint following on a bundled prompt set, perplexity
on held-out SFT data, the mean reward of its greedy responses under the pipeline's reward model, and
its win rate against `config.eval.reference` (the SFT model by default) under that reward model. With
a `pas` stage it also measures constraint following on PAS-augmented prompts. The reward model itself
gets its held-out pair accuracy. Results are kept in WORKDIR/eval/<name>.json under a key of what
produced them (the model's checkpoint step and the eval settings), so a rerun measures only what
changed; the report (align_jax.eval.report) is rewritten every time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections

from align_jax import checkpoint
from align_jax.config import resolve_data_path
from align_jax.data.sources import iter_jsonl
from align_jax.workdir import fingerprint

log = logging.getLogger(__name__)


def base_model(config: ml_collections.ConfigDict, resolve, batch_size: int = 16) -> Any:
    """The model the SFT stage started from, as a ChatModel."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from transformers import AutoTokenizer

    from align_jax.chat import ChatModel, default_sharder
    from align_jax.models.transformer import boxed_init
    from align_jax.workdir import TOKENIZER_DIR

    base = resolve(config.sft.init_from, by="eval", key="models") if config.sft.init_from else config.init_from
    if base:
        return ChatModel.load(base, name="base", dtype=config.eval.dtype, batch_size=batch_size)
    sft_dir = resolve("stage:sft", by="eval", key="models")
    saved = checkpoint.read_config(sft_dir)
    # The SFT run's own runtime settings (layers per remat unit and param dtype shape the init), so the
    # seeded init below is the one build.init_from_params gave the SFT stage; then float32 for eval.
    cfg = checkpoint.model_config_of(sft_dir, **saved.get("runtime", {}))
    params = jax.jit(lambda rng: nn.meta.unbox(boxed_init(cfg, rng)))(jax.random.key(int(config.sft.seed)))
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype="float32", remat_policy="none")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(sft_dir, TOKENIZER_DIR))
    return ChatModel(cfg, params, tokenizer, sharder=default_sharder(), name="base", batch_size=batch_size)


def _cached(path: str, key: dict, compute) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["metrics"]
    t0 = time.perf_counter()
    metrics = compute()
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    with open(path + ".tmp", "w") as f:
        json.dump({"key": json.loads(json.dumps(key)), "metrics": metrics}, f, indent=2)
    os.replace(path + ".tmp", path)
    return metrics


def rm_metrics(rm_dir: str, pref_eval: str, limit: int) -> dict[str, float]:
    from align_jax.data.formats import Origin
    from align_jax.data.preference import to_preference_record
    from align_jax.eval.reward import RewardScorer

    scorer = RewardScorer.load(rm_dir)
    prompts, chosen, rejected = [], [], []
    for i, (_, row) in enumerate(iter_jsonl(pref_eval), start=1):
        if limit and i > limit:
            break
        rec = to_preference_record(row, origin=Origin(pref_eval, i, "line"))
        prompts.append(rec["prompt"])
        chosen.append(rec["chosen"][-1]["content"])
        rejected.append(rec["rejected"][-1]["content"])
    return {"rm/accuracy": scorer.accuracy(prompts, chosen, rejected), "rm/pairs": float(len(prompts))}


def run_pipeline_eval(config: ml_collections.ConfigDict, resolve, workdir: str, order: list[str]) -> dict:
    from align_jax.chat import ChatModel
    from align_jax.eval.report import write_report
    from align_jax.eval.suite import evaluate_model
    from align_jax.eval.winrate import load_prompts
    from align_jax.metrics import Progress

    e = config.eval
    os.makedirs(workdir, exist_ok=True)
    names = [n.strip() for n in str(e.models).split(",") if n.strip()]
    for n in names:
        if n != "base" and n not in order:
            raise ValueError(f"config.eval.models names {n!r}, which is not in config.stages={config.stages!r}")
    rm_dir = resolve(e.rm, by="eval", key="rm") if e.rm else ""
    scorer = None
    if rm_dir:
        from align_jax.eval.reward import RewardScorer

        scorer = RewardScorer.load(rm_dir, dtype=e.dtype)
    reward_prompts = load_prompts(e.reward_prompts, int(e.num_reward_prompts)) if e.reward_prompts else []
    augment = None
    pas_dir = resolve(e.pas, by="eval", key="pas") if e.pas else ""
    if pas_dir:
        from align_jax.pas.augment import Augmenter

        augmenter = Augmenter.load(pas_dir, max_new_tokens=int(config.pas.pas.max_new_tokens), dtype=e.dtype)
        augment = augmenter.augment_messages
    settings = {k: e[k] for k in sorted(e.keys()) if k != "models"}  # which models: not how they are measured
    reference_name = e.reference if e.reference in names or e.reference in order else ""
    reference = None
    stage_metrics: dict[str, dict[str, float]] = {}

    batch = int(e.batch_size)

    def load(name: str):
        if name == "base":
            return base_model(config, resolve, batch)
        return ChatModel.load(os.path.join(resolve.workdir, name), batch_size=batch, dtype=e.dtype)

    sft_dir = os.path.join(resolve.workdir, "sft")
    bar = Progress(len(names))  # evaluating a model takes minutes: say which one, and how far along
    for i, name in enumerate(names, start=1):
        where = os.path.join(resolve.workdir, name)
        # A win rate needs a reward model to judge it: without one the reference is not compared.
        compare = bool(scorer) and reference_name and name != reference_name and name != "base"
        # What produced each number: the model's, the reference's, the RM's and the PAS model's outputs
        # (fingerprints of their summaries and checkpoints), and the eval settings.
        key = {
            "model": fingerprint(where)
            if name != "base"
            else [config.init_from, config.sft.init_from, int(config.sft.seed), fingerprint(sft_dir)],
            "reference": fingerprint(os.path.join(resolve.workdir, reference_name)) if compare else None,
            "rm": fingerprint(rm_dir) if rm_dir else None,
            "pas": fingerprint(pas_dir) if pas_dir else None,
            "settings": settings,
        }

        def compute(name=name, compare=compare):
            nonlocal reference
            if compare and reference is None:
                reference = load(reference_name)
            model = load(name)
            log.info("eval: %s", name)
            metrics = evaluate_model(
                model,
                constraints=e.constraints or None,
                sft_eval=resolve_data_path(e.sft_eval) if e.sft_eval else None,
                scorer=scorer,
                reward_prompts=reward_prompts or None,
                reference=reference if compare else None,
                max_new_tokens=int(e.max_new_tokens),
                limit=int(e.limit) or None,
                seq_len=int(e.seq_len),
                batch_size=int(e.batch_size),
                ppl_batches=int(e.ppl_batches) or None,
            )
            if augment is not None and e.constraints:
                from align_jax.eval.constraints import evaluate_constraints, load_prompt_set

                # One batched PAS call for the whole set; the per-prompt calls below then hit its cache.
                rows = load_prompt_set(e.constraints, int(e.limit) or None)
                augmenter.augment_conversations([r["prompt"] for r in rows])

                pas = evaluate_constraints(
                    model,
                    e.constraints,
                    max_new_tokens=int(e.max_new_tokens),
                    limit=int(e.limit) or None,
                    augment=augment,
                )
                metrics.update({f"pas/{k}": v for k, v in pas.items() if isinstance(v, int | float)})
            return metrics

        stage_metrics[name] = _cached(os.path.join(workdir, f"{name}.json"), key, compute)
        bar.update(i, f"eval: {name}")
    bar.close()
    if rm_dir:
        key = {"rm": fingerprint(rm_dir), "settings": settings}
        rm_name = e.rm[len("stage:") :] if e.rm.startswith("stage:") else "rm"
        stage_metrics[rm_name] = _cached(
            os.path.join(workdir, "rm.json"), key, lambda: rm_metrics(rm_dir, resolve_data_path(e.pref_eval), 0)
        )
    # Columns in pipeline order (base first), so the report reads left to right as the stages ran.
    column_order = ["base", *order]
    rank = {n: i for i, n in enumerate(column_order)}
    stage_metrics = dict(sorted(stage_metrics.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    curves = {n: os.path.join(resolve.workdir, n) for n in order if n in ("sft", "pas", "rm", "dpo", "grpo")}
    report = write_report(resolve.workdir, stage_metrics, curves)
    return {"report": report, "metrics": stage_metrics}

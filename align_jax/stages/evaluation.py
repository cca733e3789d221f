"""The pipeline's eval stage: every model the pipeline made, measured the same way, and a report.

For each name in `config.eval.models` ("base" = the SFT stage's starting weights: config.init_from, or
the seeded scratch init the SFT stage began from; any other name = that stage's workdir) it measures,
through `align_jax.eval.suite.evaluate_model`: constraint following on a bundled prompt set, perplexity
on held-out SFT data, the mean reward of its greedy responses under the pipeline's reward model, and
its win rate against `config.eval.reference` (the SFT model by default) under that reward model. With
`config.eval.ifeval` set (an IFEval input file, or "demo") it adds IFEval's strict and loose accuracies,
with responses of up to `config.eval.ifeval_max_new_tokens` tokens (1280 where the key is absent). With
a `pas` stage it also measures constraint following on PAS-augmented prompts. The reward model itself
gets its held-out pair accuracy. Results are kept in WORKDIR/eval/<name>.json under a key of what
produced them (the model's checkpoint step and the eval settings), so a rerun measures only what
changed; the report (align_jax.eval.report) is rewritten every time.

Every model the stage loads (each evaluated model, the win-rate reference, the reward model, the PAS
model) lives on one mesh, `eval_sharder(config)`: config.eval.mesh when the config has one (mesh axis
sizes, as in a training stage's config.mesh, and optional `rules`), else every local device on fsdp, so
each device holds 1/n of each model's weights (align_jax/chat.py says why that default).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import ml_collections

from align_jax import checkpoint
from align_jax.data.sources import iter_jsonl
from align_jax.eval.ifeval import DEFAULT_MAX_NEW_TOKENS
from align_jax.sharding import Sharder
from align_jax.workdir import fingerprint, resolve_data_path

log = logging.getLogger(__name__)


def eval_sharder(config: ml_collections.ConfigDict) -> Sharder:
    """The mesh of every model the eval stage loads: config.eval.mesh where the config has one, else every
    local device on fsdp."""
    from align_jax.chat import eval_sharder as make

    mesh = config.eval.get("mesh")
    try:
        return make(dict(mesh) if mesh else None)
    except ValueError as e:  # ShardingError: name the key it came from
        raise ValueError(f"config.eval.mesh: {e}") from None


def base_model(config: ml_collections.ConfigDict, resolve, batch_size: int = 16, sharder: Sharder | None = None) -> Any:
    """The model the SFT stage started from, as a ChatModel on `sharder`'s mesh (default: eval_sharder)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from transformers import AutoTokenizer

    from align_jax.chat import ChatModel, boxed_abstract
    from align_jax.models.transformer import boxed_init
    from align_jax.sharding import tree_shardings
    from align_jax.workdir import TOKENIZER_DIR

    sharder = sharder or eval_sharder(config)
    base = resolve(config.sft.init_from, by="eval", key="models") if config.sft.init_from else config.init_from
    if base:
        return ChatModel.load(base, name="base", dtype=config.eval.dtype, batch_size=batch_size, sharder=sharder)
    sft_dir = resolve("stage:sft", by="eval", key="models")
    saved = checkpoint.read_config(sft_dir)
    # The SFT run's own runtime settings (layers per remat unit and param dtype shape the init), so the
    # seeded init below is the one build.init_from_params gave the SFT stage; then float32 for eval. Made
    # straight into the eval shardings (the RNG is partitionable: the same values on any mesh).
    cfg = checkpoint.model_config_of(sft_dir, **saved.get("runtime", {}))
    shardings = tree_shardings(boxed_abstract(cfg, sharder), sharder)
    init = jax.jit(
        lambda rng: jax.tree.map(lambda x: x.astype(jnp.float32), nn.meta.unbox(boxed_init(cfg, rng, sharder=sharder))),
        out_shardings=shardings,
    )
    params = init(jax.random.key(int(config.sft.seed)))
    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype="float32", remat_policy="none")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(sft_dir, TOKENIZER_DIR))
    return ChatModel(cfg, params, tokenizer, sharder=sharder, name="base", batch_size=batch_size)


def _ifeval_path(e: ml_collections.ConfigDict) -> str | None:
    """config.eval.ifeval as evaluate_model takes it: None when off ("" or absent: configs that predate
    IFEval), "demo" as is, demo:NAME resolved to its bundled file."""
    path = e.get("ifeval", "")
    return resolve_data_path(path) if path else None


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


def rm_metrics(rm_dir: str, pref_eval: str, limit: int, sharder: Sharder | None = None) -> dict[str, float]:
    from align_jax.data.formats import Origin
    from align_jax.data.preference import to_preference_record
    from align_jax.eval.reward import RewardScorer

    scorer = RewardScorer.load(rm_dir, sharder=sharder)
    prompts, chosen, rejected = [], [], []
    for i, (_, row) in enumerate(iter_jsonl(pref_eval), start=1):
        if limit and i > limit:
            break
        rec = to_preference_record(row, origin=Origin(pref_eval, i, "line"))
        prompts.append(rec["prompt"])
        chosen.append(rec["chosen"][-1]["content"])
        rejected.append(rec["rejected"][-1]["content"])
    return {"rm/accuracy": scorer.accuracy(prompts, chosen, rejected), "rm/pairs": float(len(prompts))}


def _model_names(config: ml_collections.ConfigDict, order: list[str]) -> list[str]:
    """The models to evaluate, from config.eval.models; checked before anything loads, since a typo
    would otherwise surface only after minutes of loading the reward and PAS models."""
    names = [n.strip() for n in str(config.eval.models).split(",") if n.strip()]
    for n in names:
        if n != "base" and n not in order:
            raise ValueError(f"config.eval.models names {n!r}, which is not in config.stages={config.stages!r}")
    return names


def _reward_model(config: ml_collections.ConfigDict, resolve, sharder: Sharder) -> tuple[str, Any]:
    """The reward model's directory and scorer ("" and None without config.eval.rm), loaded once for
    every model's reward and win rate."""
    e = config.eval
    rm_dir = resolve(e.rm, by="eval", key="rm") if e.rm else ""
    scorer = None
    if rm_dir:
        from align_jax.eval.reward import RewardScorer

        scorer = RewardScorer.load(rm_dir, dtype=e.dtype, sharder=sharder)
    return rm_dir, scorer


def _pas_model(config: ml_collections.ConfigDict, resolve, sharder: Sharder) -> tuple[str, Any]:
    """The PAS model's directory and augmenter ("" and None without config.eval.pas), loaded once for
    every model's constraint following on augmented prompts."""
    e = config.eval
    pas_dir = resolve(e.pas, by="eval", key="pas") if e.pas else ""
    augmenter = None
    if pas_dir:
        from align_jax.pas.augment import Augmenter

        max_new = int(config.pas.max_new_tokens)
        augmenter = Augmenter.load(pas_dir, max_new_tokens=max_new, dtype=e.dtype, sharder=sharder)
    return pas_dir, augmenter


@dataclasses.dataclass
class _ModelEval:
    """What every model's evaluation shares: the reward and PAS models, loaded once, the reward prompts,
    and the eval settings. The win-rate reference is loaded on first need and then kept, so a run whose
    results are all cached loads no model at all."""

    config: ml_collections.ConfigDict
    resolve: Any
    rm_dir: str
    scorer: Any
    pas_dir: str
    augmenter: Any
    reward_prompts: list
    settings: dict
    reference_name: str
    sharder: Sharder  # the one mesh every model of the stage lives on (eval_sharder)
    reference: Any = None

    def load(self, name: str) -> Any:
        """The model `name` as a ChatModel: "base" is the SFT stage's starting weights, any other name a
        stage's workdir."""
        from align_jax.chat import ChatModel

        batch = int(self.config.eval.batch_size)
        if name == "base":
            return base_model(self.config, self.resolve, batch, sharder=self.sharder)
        where = os.path.join(self.resolve.workdir, name)
        return ChatModel.load(where, batch_size=batch, dtype=self.config.eval.dtype, sharder=self.sharder)

    def compares(self, name: str) -> bool:
        """Whether `name` gets a win rate: a win rate needs a reward model to judge it, so without one the
        reference is not compared; nor is the reference with itself, nor the base."""
        return bool(self.scorer) and bool(self.reference_name) and name != self.reference_name and name != "base"

    def key(self, name: str, compare: bool) -> dict:
        """What produced `name`'s numbers: the model's, the reference's, the RM's and the PAS model's
        outputs (fingerprints of their summaries and checkpoints), and the eval settings; a cached result
        with another key is measured again."""
        config, workdir = self.config, self.resolve.workdir
        sft_dir = os.path.join(workdir, "sft")
        return {
            "model": fingerprint(os.path.join(workdir, name))
            if name != "base"
            else [config.init_from, config.sft.init_from, int(config.sft.seed), fingerprint(sft_dir)],
            "reference": fingerprint(os.path.join(workdir, self.reference_name)) if compare else None,
            "rm": fingerprint(self.rm_dir) if self.rm_dir else None,
            "pas": fingerprint(self.pas_dir) if self.pas_dir else None,
            "settings": self.settings,
        }

    def measure(self, name: str, compare: bool) -> dict:
        """Loads and evaluates `name` (see the module doc), adding its PAS metrics when there is a PAS
        model."""
        from align_jax.eval.suite import evaluate_model

        e = self.config.eval
        if compare and self.reference is None:
            self.reference = self.load(self.reference_name)
        model = self.load(name)
        log.info("eval: %s", name)
        metrics = evaluate_model(
            model,
            constraints=e.constraints or None,
            ifeval=_ifeval_path(e),
            ifeval_max_new_tokens=int(e.get("ifeval_max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            sft_eval=resolve_data_path(e.sft_eval) if e.sft_eval else None,
            scorer=self.scorer,
            reward_prompts=self.reward_prompts or None,
            reference=self.reference if compare else None,
            max_new_tokens=int(e.max_new_tokens),
            limit=int(e.limit) or None,
            seq_len=int(e.seq_len),
            batch_size=int(e.batch_size),
            ppl_batches=int(e.ppl_batches) or None,
        )
        if self.augmenter is not None and e.constraints:
            metrics.update(self.pas_metrics(model))
        return metrics

    def pas_metrics(self, model: Any) -> dict:
        """Constraint following on PAS-augmented prompts, under "pas/" names beside the plain ones."""
        from align_jax.eval.constraints import evaluate_constraints, load_prompt_set

        e = self.config.eval
        # One batched PAS call for the whole set; the per-prompt calls below then hit its cache.
        rows = load_prompt_set(e.constraints, int(e.limit) or None)
        self.augmenter.augment_conversations([r["prompt"] for r in rows])

        pas = evaluate_constraints(
            model,
            e.constraints,
            max_new_tokens=int(e.max_new_tokens),
            limit=int(e.limit) or None,
            augment=self.augmenter.augment_messages,
        )
        return {f"pas/{k}": v for k, v in pas.items() if isinstance(v, int | float)}


def _evaluate_models(ev: _ModelEval, names: list[str], workdir: str) -> dict[str, dict[str, float]]:
    """Each model's metrics, from WORKDIR/<name>.json when its key is unchanged, else measured and
    stored there."""
    from align_jax.metrics import Progress

    stage_metrics: dict[str, dict[str, float]] = {}
    bar = Progress(len(names))  # evaluating a model takes minutes: say which one, and how far along
    for i, name in enumerate(names, start=1):
        compare = ev.compares(name)
        key = ev.key(name, compare)
        stage_metrics[name] = _cached(
            os.path.join(workdir, f"{name}.json"), key, lambda name=name, compare=compare: ev.measure(name, compare)
        )
        bar.update(i, f"eval: {name}")
    bar.close()
    return stage_metrics


def _in_pipeline_order(stage_metrics: dict[str, dict[str, float]], order: list[str]) -> dict[str, dict[str, float]]:
    """Columns in pipeline order (base first), so the report reads left to right as the stages ran;
    names outside the pipeline (the RM's default "rm") go last."""
    column_order = ["base", *order]
    rank = {n: i for i, n in enumerate(column_order)}
    return dict(sorted(stage_metrics.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def run_pipeline_eval(config: ml_collections.ConfigDict, resolve, workdir: str, order: list[str]) -> dict:
    """Evaluates the models of config.eval.models and the reward model, keeping results in `workdir`
    (the eval stage's), and rewrites the report; returns {"report": ..., "metrics": {name: metrics}}."""
    from align_jax.eval.report import write_report
    from align_jax.eval.winrate import load_prompts

    e = config.eval
    os.makedirs(workdir, exist_ok=True)
    names = _model_names(config, order)
    sharder = eval_sharder(config)
    rm_dir, scorer = _reward_model(config, resolve, sharder)
    reward_prompts = load_prompts(e.reward_prompts, int(e.num_reward_prompts)) if e.reward_prompts else []
    pas_dir, augmenter = _pas_model(config, resolve, sharder)
    # Which models, and the mesh they run on, are not how they are measured: a cached result stays valid.
    settings = {k: e[k] for k in sorted(e.keys()) if k not in ("models", "mesh")}
    reference_name = e.reference if e.reference in names or e.reference in order else ""
    ev = _ModelEval(
        config, resolve, rm_dir, scorer, pas_dir, augmenter, reward_prompts, settings, reference_name, sharder
    )

    stage_metrics = _evaluate_models(ev, names, workdir)
    if rm_dir:
        key = {"rm": fingerprint(rm_dir), "settings": settings}
        rm_name = e.rm[len("stage:") :] if e.rm.startswith("stage:") else "rm"
        stage_metrics[rm_name] = _cached(
            os.path.join(workdir, "rm.json"),
            key,
            lambda: rm_metrics(rm_dir, resolve_data_path(e.pref_eval), 0, sharder=sharder),
        )
    stage_metrics = _in_pipeline_order(stage_metrics, order)
    curves = {n: os.path.join(resolve.workdir, n) for n in order if n in ("sft", "pas", "rm", "dpo", "grpo")}
    report = write_report(resolve.workdir, stage_metrics, curves)
    return {"report": report, "metrics": stage_metrics}

"""The run config: one schema shared by every stage, filled in by `configs/<stage>.py` presets.

`base_config(stage)` returns a locked `ml_collections.ConfigDict` holding every key a stage reads,
with defaults; presets change values, and `--config.x=y` on the command line can only set keys that
exist (a typo fails at once, naming the key). `validate` then checks values and cross-field rules
before anything is built, so a bad config fails in a second, not after compilation.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from align_jax.errors import UserError
from align_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES
from align_jax.sharding import MESH_AXES, normalize_rules

STAGES = ("sft", "rm", "dpo", "grpo", "pas", "pipeline")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
# The rm and dpo stages' row formats (align_jax/data/preference.py; a test keeps the two in step).
PREFERENCE_FORMATS = ("auto", "hh_rlhf", "preference", "kto")
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


class ConfigValueError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    # Params-only init: an HF directory or a previous stage's workdir (DESIGN.md, init precedence).
    c.init_from = ""
    # "" = the tokenizer of init_from; "demo" = train a small BPE on the training data; else a path.
    c.tokenizer = ""
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # Architecture, used only when training from scratch (init_from unset); an HF init reads config.json.
    c.model.model_type = "llama"
    c.model.vocab_size = 512
    c.model.hidden_size = 128
    c.model.intermediate_size = 352
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 0  # 0: hidden_size // num_heads
    c.model.rope_theta = 10000.0
    c.model.max_position_embeddings = 2048
    c.model.tie_word_embeddings = True
    # Runtime settings (apply to HF inits too).
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "auto"
    c.model.remat_policy = "none"
    c.model.layers_per_unit = 1
    c.model.scan_unroll = 1  # num_layers = fully unrolled (small models on CPU)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # path, glob, "demo:NAME" (bundled data) or a datasets name
    c.data.eval = ""
    c.data.format = "auto"
    c.data.seq_len = 256
    c.data.batch_size = 8  # global, in packed rows
    c.data.loss_on = "assistant"  # assistant | last_assistant | all
    c.data.over_long = "truncate"  # truncate | drop
    c.data.on_bad_row = "error"  # error | skip
    c.data.shuffle_seed = 0
    c.data.pack_window = 1000
    c.data.eval_batches = 0  # 0: the whole eval split
    # Preference data (rm, dpo): most pairs packed into one row (0: seq_len // 32), and KTO's unpaired
    # view of paired data (each pair -> a desirable and an undesirable example).
    c.data.max_pairs = 0
    c.data.unpaired = False

    c.mesh = ml_collections.ConfigDict({ax: (-1 if ax == "data" else 1) for ax in MESH_AXES})
    # Overrides of the default logical-axis rules, as (logical_name, mesh_axes) pairs.
    c.rules = ()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 10
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.microbatches = 1
    c.train.z_loss = 0.0
    # Positions per chunk of the LM head + loss (0: all at once). Large vocabularies want ~1024:
    # only one chunk's [B, chunk, V] logits then exist.
    c.train.loss_chunk = 0
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.ckpt_every = 0
    c.train.keep = 3  # latest checkpoints kept (the final one always is); 0: keep every checkpoint
    c.train.best_metric = ""  # e.g. "eval_loss": also keep the best checkpoint by it
    c.train.async_checkpoint = True
    c.train.progress = True
    c.train.peak_flops = 0.0  # per device, for MFU; 0 -> from the device kind

    # Reward model (stage rm), the report's Eq. 1: -log sigmoid(r_c - r_r - margin)
    # + score_weight * [(r_c - s_c)^2 + (r_r - s_r)^2] on rows with absolute scores, + center_weight * (r_c + r_r)^2.
    c.rm = ml_collections.ConfigDict()
    c.rm.margin = 0.0
    c.rm.score_weight = 0.0
    c.rm.center_weight = 0.0

    # Preference optimisation (stage dpo): align_jax/losses/dpo.py and preference.py.
    c.dpo = ml_collections.ConfigDict()
    c.dpo.loss_type = "sigmoid"  # a DPO loss type, or simpo | orpo | kto
    c.dpo.beta = 0.1
    c.dpo.label_smoothing = 0.0
    c.dpo.gamma = 0.5  # SimPO
    c.dpo.rpo_alpha = 0.0  # + rpo_alpha * chosen NLL (RPO)
    c.dpo.desirable_weight = 1.0  # KTO
    c.dpo.undesirable_weight = 1.0
    c.dpo.reference_free = False
    # Where reference log-probs come from: "in_step" (frozen reference params, a forward pass in every
    # step) or "precomputed" (one pass before training, cached on disk; see align_jax/reference.py).
    c.dpo.reference = "in_step"
    c.dpo.ref_cache_dir = ""  # "" -> ~/.cache/align_jax/ref_logps

    # Online RL (stage grpo): align_jax/stages/grpo.py, losses/rl.py, rewards.py. data.batch_size counts
    # sampled responses per step: batch_size / group_size prompts, group_size samples each.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.group_size = 3  # samples per prompt (the report's n = 3)
    c.grpo.max_prompt_len = 128  # prompt tokens kept (the end of longer prompts); also the prompt bucket
    c.grpo.max_new_tokens = 64
    c.grpo.temperature = 1.0
    c.grpo.top_k = 0
    c.grpo.top_p = 1.0
    c.grpo.updates_per_rollout = 1  # optimizer steps on each rollout batch (each is one loop step)
    c.grpo.clip_eps = 0.2
    c.grpo.clip_eps_high = 0.0  # 0: = clip_eps; larger: DAPO's clip-higher
    c.grpo.normalise = "token"  # token | sequence
    c.grpo.advantage_scale = "std"  # std (GRPO) | none (Dr. GRPO)
    # KL to the frozen reference (init_from): "reward" puts it in the token-level reward (the report),
    # "loss" adds kl_coef * KL to the loss (DeepSeekMath), "none" drops it.
    c.grpo.kl_mode = "reward"
    c.grpo.kl_coef = 0.05
    c.grpo.kl_estimator = "topk"  # k1 | k3 | topk (exact KL over the reference's top-k logits)
    c.grpo.kl_topk = 500
    c.grpo.rules = "exact_match:1.0"  # reward rules by name (align_jax/rewards.py) with weights
    c.grpo.rule_kwargs = "{}"  # JSON: {"rule": {"kwarg": value}}
    c.grpo.rm_workdir = ""  # a trained rm stage's workdir, added to the reward with rm_weight
    c.grpo.rm_weight = 1.0
    # PTX: a term on SFT data that keeps the policy near the original model there. "kl": the report's
    # exact KL(policy || reference) over the reference's top-k logits; "nll": plain next-token NLL.
    c.grpo.ptx_coef = 0.0  # 0: off
    c.grpo.ptx_kind = "kl"
    c.grpo.ptx_data = ""  # SFT chat data (path or demo:NAME), packed into ptx_batch_size rows of data.seq_len
    c.grpo.ptx_batch_size = 8
    # "ppo" instead of GRPO: a value model (init_from's decoder + a fresh scalar head) trained alongside,
    # per-token rewards with the KL inside (kl_mode must be "reward"), GAE advantages, clipped value loss.
    c.grpo.algorithm = "grpo"
    c.grpo.gamma = 1.0
    c.grpo.lam = 0.95
    c.grpo.vf_coef = 0.1
    c.grpo.value_clip_eps = 0.2
    c.grpo.augment = "none"  # prompt augmentation before sampling: a name in stages/grpo.AUGMENTERS, or pas:PAS_WORKDIR
    c.grpo.eval_prompts = 64  # eval: greedy responses to this many eval prompts

    # Prompt Augmentation System (stage pas): curate prompts, have a teacher write complements (judged,
    # regenerated when invalid), then train the PAS model on them with the SFT machinery (data.* here
    # describes that training; data.train is the file the stage writes). align_jax/stages/pas.py.
    c.pas = ml_collections.ConfigDict()
    c.pas.prompts = ""  # the raw prompts: {"prompt": ...} or {"messages": [...]} rows (a path or demo:NAME)
    c.pas.max_prompts = 0  # read at most this many (0: all)
    c.pas.embedder = "hashed"  # hashed[:DIM] | an align_jax workdir or HF decoder dir | an HF encoder dir
    c.pas.dedup_threshold = 0.9  # drop a prompt whose cosine to an earlier kept one is >= this
    c.pas.n_clusters = "64"  # k-means clusters; "8,8" = layered (k-means within each cluster)
    c.pas.per_cluster = 40  # prompts kept per cluster, nearest its centroid (0: all)
    c.pas.select = "nearest"  # nearest | spread
    c.pas.quality = ""  # "" | a reward-model workdir | a judge model (workdir or HF dir) prompted to score 1-10
    c.pas.quality_kind = "rm"  # rm | judge: how to read pas.quality
    c.pas.min_quality = 0.0  # with pas.quality: keep prompts scoring at least this
    c.pas.tagger = "demo"  # demo (the demo's templates) | centroid (few-shot embedding centroids) | a model dir
    c.pas.categories = ""  # comma-separated; empty: the demo categories
    c.pas.balance_cap = 0  # most prompts per category (0: no cap)
    c.pas.teacher = "template"  # template (offline demo stand-in) | a model (workdir or HF dir)
    c.pas.judge = "rule"  # rule | a model (workdir or HF dir) prompted with the report's criteria
    c.pas.max_attempts = 3  # teacher attempts per prompt before it stays invalid
    c.pas.few_shot = 3
    c.pas.flaw_rate = 0.15  # template teacher: share of deliberately flawed first drafts (exercises the judge)
    c.pas.max_new_tokens = 32  # complement length (teacher and, at inference, the PAS model)
    c.pas.eval_fraction = 0.05  # complements held out as the PAS model's eval split

    c.metrics = ml_collections.ConfigDict()
    c.metrics.tensorboard = True
    c.metrics.wandb_project = ""
    return c


def _positive(c, *keys):
    for key in keys:
        node = c
        for part in key.split("."):
            node = node[part]
        if not node > 0:
            raise ConfigValueError(f"config.{key} must be positive, got {node}")


def _one_of(value: Any, allowed: tuple, key: str):
    if value not in allowed:
        raise ConfigValueError(f"config.{key}={value!r} is not one of {allowed}")


PIPELINE_STAGES = ("sft", "pas", "rm", "dpo", "grpo", "merge", "eval")
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock")


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
            raise ConfigValueError(f"config.{name}: {e}") from None
    if "merge" in names:
        _one_of(c.merge.method, MERGE_METHODS, "merge.method")
        if not 0.0 <= c.merge.t <= 1.0 or not 0.0 < c.merge.density <= 1.0 or not 0.0 <= c.merge.drop_rate < 1.0:
            raise ConfigValueError(
                f"config.merge: need 0 <= t <= 1, 0 < density <= 1, 0 <= drop_rate < 1; got "
                f"{c.merge.t}, {c.merge.density}, {c.merge.drop_rate}"
            )
    if "eval" in names:
        _positive(c, "eval.max_new_tokens", "eval.seq_len", "eval.batch_size")
        _one_of(c.eval.dtype, ("float32", "bfloat16"), "eval.dtype")
    return c


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks values and cross-field rules; returns the config for chaining."""
    _one_of(c.stage, STAGES, "stage")
    if c.stage == "pipeline":
        return validate_pipeline(c)
    _positive(c, "data.seq_len", "data.batch_size", "train.steps", "train.microbatches", "train.log_every", "optim.lr")
    _one_of(c.data.format, PREFERENCE_FORMATS if c.stage in ("rm", "dpo") else DATA_FORMATS, "data.format")
    _one_of(c.data.loss_on, ("assistant", "last_assistant", "all"), "data.loss_on")
    _one_of(c.data.over_long, ("truncate", "drop"), "data.over_long")
    _one_of(c.data.on_bad_row, ("error", "skip"), "data.on_bad_row")
    _one_of(c.model.remat_policy, REMAT_POLICIES, "model.remat_policy")
    _one_of(c.model.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
    _one_of(c.optim.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    for key in ("optim.warmup_steps", "train.keep", "train.eval_every", "train.ckpt_every"):
        section, name = key.split(".")
        if c[section][name] < 0:
            raise ConfigValueError(f"config.{key}={c[section][name]} must be >= 0")
    if c.train.loss_chunk < 0:
        raise ConfigValueError(f"config.train.loss_chunk={c.train.loss_chunk} must be >= 0 (0: no chunking)")
    if c.data.batch_size % c.train.microbatches:
        raise ConfigValueError(
            f"config.data.batch_size={c.data.batch_size} is not divisible by config.train.microbatches={c.train.microbatches}"
        )
    if not c.data.train and c.stage != "pas":  # the pas stage writes its own training file
        raise ConfigValueError("config.data.train is empty: give a file, glob, 'demo:NAME' or dataset name")
    if c.model.num_layers % c.model.layers_per_unit:
        raise ConfigValueError(
            f"config.model.layers_per_unit={c.model.layers_per_unit} must divide num_layers={c.model.num_layers}"
        )
    sizes = [c.mesh[ax] for ax in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigValueError(f"config.mesh={dict(c.mesh)}: sizes are positive, with at most one -1")
    normalize_rules(c.rules)
    if c.stage == "dpo":
        from align_jax.losses.dpo import LOSS_TYPES

        _one_of(c.dpo.loss_type, LOSS_TYPES, "dpo.loss_type")
        _one_of(c.dpo.reference, ("in_step", "precomputed"), "dpo.reference")
        _positive(c, "dpo.beta")
        if c.dpo.loss_type == "kto" and not c.data.unpaired and c.data.format != "kto":
            raise ConfigValueError(
                "config.dpo.loss_type='kto' trains on unpaired examples: set config.data.unpaired=True to "
                "split paired data, or give unpaired rows with config.data.format='kto'"
            )
    if c.stage == "grpo":
        _one_of(c.grpo.kl_mode, ("reward", "loss", "none"), "grpo.kl_mode")
        _one_of(c.grpo.kl_estimator, ("k1", "k3", "topk"), "grpo.kl_estimator")
        _one_of(c.grpo.normalise, ("token", "sequence"), "grpo.normalise")
        _one_of(c.grpo.advantage_scale, ("std", "none"), "grpo.advantage_scale")
        _positive(c, "grpo.group_size", "grpo.max_prompt_len", "grpo.max_new_tokens", "grpo.updates_per_rollout")
        if c.data.batch_size % c.grpo.group_size:
            raise ConfigValueError(
                f"config.data.batch_size={c.data.batch_size} (responses per step) is not a multiple of "
                f"config.grpo.group_size={c.grpo.group_size}"
            )
        _one_of(c.grpo.ptx_kind, ("kl", "nll"), "grpo.ptx_kind")
        _one_of(c.grpo.algorithm, ("grpo", "ppo"), "grpo.algorithm")
        if c.grpo.algorithm == "ppo" and c.grpo.kl_mode == "loss":
            raise ConfigValueError("config.grpo.algorithm='ppo' keeps the KL in the reward: kl_mode 'reward' or 'none'")
        if c.grpo.ptx_coef and not c.grpo.ptx_data:
            raise ConfigValueError("config.grpo.ptx_coef > 0 needs config.grpo.ptx_data (SFT chat data)")
        if c.grpo.ptx_coef and c.grpo.ptx_batch_size % c.train.microbatches:
            raise ConfigValueError(
                f"config.grpo.ptx_batch_size={c.grpo.ptx_batch_size} is not divisible by "
                f"config.train.microbatches={c.train.microbatches}"
            )
        if c.grpo.kl_estimator == "topk" and c.grpo.kl_mode == "loss":
            raise ConfigValueError("config.grpo.kl_estimator='topk' is for kl_mode='reward'; use k1 or k3 as a loss")
    if c.stage == "pas":
        if not c.pas.prompts:
            raise ConfigValueError(
                "config.pas.prompts is empty: give the prompts to curate (a JSONL path or demo:NAME)"
            )
        if not 0.0 < c.pas.dedup_threshold <= 1.0 or not 0.0 <= c.pas.eval_fraction < 0.5:
            raise ConfigValueError("config.pas: need 0 < dedup_threshold <= 1 and 0 <= eval_fraction < 0.5")
        _one_of(c.pas.select, ("nearest", "spread"), "pas.select")
        _one_of(c.pas.quality_kind, ("rm", "judge"), "pas.quality_kind")
        _positive(c, "pas.max_attempts", "pas.max_new_tokens")
        for key in ("embedder", "tagger", "teacher", "judge"):
            if not c.pas[key]:
                raise ConfigValueError(f"config.pas.{key} is empty")
        if not all(k.strip().isdigit() and int(k) > 0 for k in str(c.pas.n_clusters).split(",")):
            raise ConfigValueError(f"config.pas.n_clusters={c.pas.n_clusters!r}: positive integers, comma-separated")
    if c.data.max_pairs < 0:
        raise ConfigValueError(f"config.data.max_pairs={c.data.max_pairs} must be >= 0 (0: seq_len // 32)")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigValueError(f"config.optim.min_lr_ratio={c.optim.min_lr_ratio} must be in [0, 1]")
    return c


EVAL_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval", "data")


def resolve_data_path(path: str) -> str:
    """`demo:NAME` names a bundled file: align_jax/data/demo/NAME.jsonl, else align_jax/eval/data/NAME.jsonl
    (the prompt sets with checks, e.g. demo:constraints_rl for GRPO); anything else is as given."""
    if path.startswith("demo:"):
        name = path[len("demo:") :] + ".jsonl"
        for directory in (DEMO_DIR, EVAL_DATA_DIR):
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        return os.path.join(DEMO_DIR, name)
    return path

"""Each stage's own settings, with their checks. They sit at the top level of the stage's config
(`config.beta` in a dpo config), so a pipeline config reaches them as `config.dpo.beta` (the stage's
config is `config.dpo`) instead of repeating the stage name."""

from __future__ import annotations

import ml_collections

from align_jax.config.sections import ConfigValueError, one_of, positive


def rm_section() -> ml_collections.ConfigDict:
    # The report's Eq. 1: -log sigmoid(r_c - r_r - margin) + score_weight * [(r_c - s_c)^2 + (r_r - s_r)^2]
    # on rows with absolute scores, + center_weight * (r_c + r_r)^2.
    s = ml_collections.ConfigDict()
    s.margin = 0.0
    s.score_weight = 0.0
    s.center_weight = 0.0
    return s


def dpo_section() -> ml_collections.ConfigDict:
    # align_jax/losses/dpo.py and preference.py.
    s = ml_collections.ConfigDict()
    s.loss_type = "sigmoid"  # a DPO loss type, or simpo | orpo | kto
    s.beta = 0.1
    s.label_smoothing = 0.0
    s.gamma = 0.5  # SimPO
    s.rpo_alpha = 0.0  # + rpo_alpha * chosen NLL (RPO)
    s.desirable_weight = 1.0  # KTO
    s.undesirable_weight = 1.0
    s.reference_free = False
    s.bco_shift = "none"  # bco_pair's reward shift: none (TRL 1.x) | batch_mean (older TRL's baseline)
    s.discopop_tau = 0.05  # discopop's temperature (TRL's default)
    # Where reference log-probs come from: "in_step" (frozen reference params, a forward pass in every
    # step) or "precomputed" (one pass before training, cached on disk; see align_jax/reference.py).
    s.reference = "in_step"
    s.ref_cache_dir = ""  # "" -> ~/.cache/align_jax/ref_logps
    return s


def validate_dpo(c: ml_collections.ConfigDict) -> None:
    from align_jax.losses.dpo import BCO_SHIFTS, LOSS_TYPES

    one_of(c.loss_type, LOSS_TYPES, "loss_type")
    one_of(c.reference, ("in_step", "precomputed"), "reference")
    one_of(c.bco_shift, BCO_SHIFTS, "bco_shift")
    positive(c, "beta", "discopop_tau")
    if c.loss_type == "kto" and not c.data.unpaired and c.data.format != "kto":
        raise ConfigValueError(
            "config.loss_type='kto' trains on unpaired examples: set config.data.unpaired=True to "
            "split paired data, or give unpaired rows with config.data.format='kto'"
        )


def grpo_section() -> ml_collections.ConfigDict:
    # Online RL: align_jax/stages/grpo.py, rollout.py, losses/grpo.py, rewards.py. data.batch_size counts
    # sampled responses per step: batch_size / group_size prompts, group_size samples each.
    s = ml_collections.ConfigDict()
    s.group_size = 3  # samples per prompt (the report's n = 3)
    s.max_prompt_len = 128  # prompt tokens kept (the end of longer prompts); also the prompt bucket
    s.max_new_tokens = 64
    s.temperature = 1.0
    s.top_k = 0
    s.top_p = 1.0
    s.updates_per_rollout = 1  # optimizer steps on each rollout batch (each is one loop step)
    s.clip_eps = 0.2
    s.clip_eps_high = 0.0  # 0: = clip_eps; larger: DAPO's clip-higher
    s.normalise = "token"  # token | sequence
    s.advantage_scale = "std"  # std (GRPO) | none (Dr. GRPO)
    # KL to the frozen reference (init_from): "reward" puts it in the token-level reward (the report),
    # "loss" adds kl_coef * KL to the loss (DeepSeekMath), "none" drops it.
    s.kl_mode = "reward"
    s.kl_coef = 0.05
    s.kl_estimator = "topk"  # k1 | k3 | topk (exact KL over the reference's top-k logits)
    s.kl_topk = 500
    s.rules = "exact_match:1.0"  # reward rules by name (align_jax/rewards.py) with weights
    s.rule_kwargs = "{}"  # JSON: {"rule": {"kwarg": value}}
    s.rm_workdir = ""  # a trained rm stage's workdir, added to the reward with rm_weight
    s.rm_weight = 1.0
    # PTX: a term on SFT data that keeps the policy near the original model there. "kl": the report's
    # exact KL(policy || reference) over the reference's top-k logits; "nll": plain next-token NLL.
    s.ptx_coef = 0.0  # 0: off
    s.ptx_kind = "kl"
    s.ptx_data = ""  # SFT chat data (path or demo:NAME), packed into ptx_batch_size rows of data.seq_len
    s.ptx_batch_size = 8
    # "ppo" instead of GRPO: a value model (init_from's decoder + a fresh scalar head) trained alongside,
    # per-token rewards with the KL inside (kl_mode must be "reward"), GAE advantages, clipped value loss.
    s.algorithm = "grpo"
    s.gamma = 1.0
    s.lam = 0.95
    s.vf_coef = 0.1
    s.value_clip_eps = 0.2
    s.augment = "none"  # prompt augmentation before sampling: a name in pas/augment.AUGMENTERS, or pas:PAS_WORKDIR
    s.eval_prompts = 64  # eval: greedy responses to this many eval prompts
    return s


def validate_grpo(c: ml_collections.ConfigDict) -> None:
    one_of(c.kl_mode, ("reward", "loss", "none"), "kl_mode")
    one_of(c.kl_estimator, ("k1", "k3", "topk"), "kl_estimator")
    one_of(c.normalise, ("token", "sequence"), "normalise")
    one_of(c.advantage_scale, ("std", "none"), "advantage_scale")
    positive(c, "group_size", "max_prompt_len", "max_new_tokens", "updates_per_rollout")
    if c.data.batch_size % c.group_size:
        raise ConfigValueError(
            f"config.data.batch_size={c.data.batch_size} (responses per step) is not a multiple of "
            f"config.group_size={c.group_size}"
        )
    one_of(c.ptx_kind, ("kl", "nll"), "ptx_kind")
    one_of(c.algorithm, ("grpo", "ppo"), "algorithm")
    if c.algorithm == "ppo" and c.kl_mode == "loss":
        raise ConfigValueError("config.algorithm='ppo' keeps the KL in the reward: kl_mode 'reward' or 'none'")
    if c.ptx_coef and not c.ptx_data:
        raise ConfigValueError("config.ptx_coef > 0 needs config.ptx_data (SFT chat data)")
    if c.ptx_coef and c.ptx_batch_size % c.train.microbatches:
        raise ConfigValueError(
            f"config.ptx_batch_size={c.ptx_batch_size} is not divisible by "
            f"config.train.microbatches={c.train.microbatches}"
        )
    if c.kl_estimator == "topk" and c.kl_mode == "loss":
        raise ConfigValueError("config.kl_estimator='topk' is for kl_mode='reward'; use k1 or k3 as a loss")


def pas_section() -> ml_collections.ConfigDict:
    # Prompt Augmentation System: curate prompts, have a teacher write complements (judged, regenerated
    # when invalid), then train the PAS model on them with the SFT machinery (data.* describes that
    # training; data.train is the file the stage writes). align_jax/stages/pas.py.
    s = ml_collections.ConfigDict()
    s.prompts = ""  # the raw prompts: {"prompt": ...} or {"messages": [...]} rows (a path or demo:NAME)
    s.max_prompts = 0  # read at most this many (0: all)
    s.embedder = "hashed"  # hashed[:DIM] | an align_jax workdir or HF decoder dir | an HF encoder dir
    s.dedup_threshold = 0.9  # drop a prompt whose cosine to an earlier kept one is >= this
    s.n_clusters = "64"  # k-means clusters; "8,8" = layered (k-means within each cluster)
    s.per_cluster = 40  # prompts kept per cluster, nearest its centroid (0: all)
    s.select = "nearest"  # nearest | spread
    s.quality = ""  # "" | a reward-model workdir | a judge model (workdir or HF dir) prompted to score 1-10
    s.quality_kind = "rm"  # rm | judge: how to read quality
    s.min_quality = 0.0  # with quality: keep prompts scoring at least this
    s.tagger = "demo"  # demo (the demo's templates) | centroid (few-shot embedding centroids) | a model dir
    s.categories = ""  # comma-separated; empty: the demo categories
    s.balance_cap = 0  # most prompts per category (0: no cap)
    s.teacher = "template"  # template (offline demo stand-in) | a model (workdir or HF dir)
    s.judge = "rule"  # rule | a model (workdir or HF dir) prompted with the report's criteria
    s.max_attempts = 3  # teacher attempts per prompt before it stays invalid
    s.few_shot = 3
    s.flaw_rate = 0.15  # template teacher: share of deliberately flawed first drafts (exercises the judge)
    s.max_new_tokens = 32  # complement length (teacher and, at inference, the PAS model)
    s.eval_fraction = 0.05  # complements held out as the PAS model's eval split
    return s


def validate_pas(c: ml_collections.ConfigDict) -> None:
    if not c.prompts:
        raise ConfigValueError("config.prompts is empty: give the prompts to curate (a JSONL path or demo:NAME)")
    if not 0.0 < c.dedup_threshold <= 1.0 or not 0.0 <= c.eval_fraction < 0.5:
        raise ConfigValueError("config: pas needs 0 < dedup_threshold <= 1 and 0 <= eval_fraction < 0.5")
    one_of(c.select, ("nearest", "spread"), "select")
    one_of(c.quality_kind, ("rm", "judge"), "quality_kind")
    positive(c, "max_attempts", "max_new_tokens")
    for key in ("embedder", "tagger", "teacher", "judge"):
        if not c[key]:
            raise ConfigValueError(f"config.{key} is empty")
    if not all(k.strip().isdigit() and int(k) > 0 for k in str(c.n_clusters).split(",")):
        raise ConfigValueError(f"config.n_clusters={c.n_clusters!r}: positive integers, comma-separated")


# stage -> (its own settings, their checks); sft has none beyond the shared sections.
STAGE_SECTIONS = {
    "sft": (None, None),
    "rm": (rm_section, None),
    "dpo": (dpo_section, validate_dpo),
    "grpo": (grpo_section, validate_grpo),
    "pas": (pas_section, validate_pas),
}

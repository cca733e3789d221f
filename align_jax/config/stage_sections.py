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
    # The policy loss (align_jax/losses/rl.py): ppo_clip | gspo (sequence-level ratio, GSPO) | cispo
    # (clipped IS weight as a constant, MiniMax-M1).
    s.policy_loss = "ppo_clip"
    s.clip_eps = 0.2  # ppo_clip's range; cispo's IS-weight bounds (1.0: no lower bound, as MiniMax-M1)
    s.clip_eps_high = 0.0  # 0: = clip_eps; larger: DAPO's clip-higher
    s.gspo_clip_eps = 3e-4  # gspo's range on the sequence ratio (the paper's 3e-4 / 4e-4)
    s.gspo_clip_eps_high = 4e-4
    s.normalise = "token"  # token | sequence | constant (Dr. GRPO: / (samples x max_new_tokens))
    # Advantages (align_jax/losses/advantages.py): grpo (advantage_scale std, or none = Dr. GRPO) | rloo |
    # reinforce_pp (REINFORCE++: returns of the KL-shaped token rewards, whitened over the batch) |
    # reinforce_pp_baseline (the group's mean score subtracted first).
    s.advantage = "grpo"
    s.advantage_scale = "std"  # std (GRPO) | none (Dr. GRPO); advantage = grpo only
    # DAPO's dynamic sampling: up to this many extra rounds of batch_size / group_size prompts when groups
    # whose rewards are all equal were dropped; slots still empty take dropped groups. 0: off.
    s.dynamic_sampling_max_rounds = 0
    # DAPO's overlong shaping: responses longer than max_new_tokens - overlong_buffer lose up to
    # overlong_penalty_factor of reward, linearly to the limit. 0: off.
    s.overlong_buffer = 0
    s.overlong_penalty_factor = 1.0
    # Truncated importance sampling: each token's term x min(exp(old_logp - sampler_logp), tis_cap), for
    # rollouts from a sampler that differs from the trainer (numerics, stale params). 0: off; else >= 1.
    s.tis_cap = 0.0
    # Rollouts sampled ahead (align_jax/sample_ahead.py): the samples of rollout k + s are drawn, in a
    # background thread from a copy of the params, while rollout k's update trains. 0: synchronous.
    # With s > 0 set tis_cap too: the samples are s updates old.
    s.rollout_staleness = 0
    # Decode rows of the refill engine (align_jax/engine.py): a row that ends takes the next prompt, which
    # pays when response lengths vary and rows > slots. 0: every response of the rollout in one batch
    # (align_jax/generate.py). Samples differ between the two (the engine keys them per prompt).
    s.rollout_slots = 0
    # Multi-turn episodes against an environment instead of single replies (align_jax/envs/, e.g.
    # "calculator"): the environment is the reward (rules and rm_workdir unset), its messages are tokens
    # of the row with no loss, and a row (prompt + every turn) is data.seq_len tokens. "": off.
    s.env = ""
    s.env_max_turns = 4
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
    one_of(c.normalise, ("token", "sequence", "constant"), "normalise")
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
    validate_grpo_variants(c)


def validate_grpo_variants(c: ml_collections.ConfigDict) -> None:
    """The policy-loss, advantage, DAPO and importance-sampling keys, and the combinations that make no sense."""
    one_of(c.policy_loss, ("ppo_clip", "gspo", "cispo"), "policy_loss")
    one_of(c.advantage, ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"), "advantage")
    if not 0.0 < c.clip_eps <= 1.0 or c.clip_eps_high < 0:
        raise ConfigValueError(
            f"config: need 0 < clip_eps <= 1 and clip_eps_high >= 0, got {c.clip_eps}, {c.clip_eps_high}"
        )
    if not 0.0 < c.gspo_clip_eps < 1.0 or c.gspo_clip_eps_high < 0:
        raise ConfigValueError("config: need 0 < gspo_clip_eps < 1 and gspo_clip_eps_high >= 0 (the paper: 3e-4, 4e-4)")
    if c.policy_loss == "gspo" and c.normalise != "sequence":
        raise ConfigValueError(
            f"config.policy_loss='gspo' weighs each sample once (its ratio is per sequence): set "
            f"config.normalise='sequence', not {c.normalise!r}"
        )
    if c.algorithm == "ppo" and (c.policy_loss == "gspo" or c.advantage != "grpo"):
        raise ConfigValueError(
            "config.algorithm='ppo' has per-token GAE advantages from its value model: use policy_loss ppo_clip or "
            "cispo and leave config.advantage='grpo' (gspo and the rloo / reinforce_pp advantages are critic-free)"
        )
    needs_groups = c.advantage in ("rloo", "reinforce_pp_baseline") or (
        c.advantage == "grpo" and c.advantage_scale == "std"
    )
    if needs_groups and c.group_size < 2 and c.algorithm == "grpo":
        raise ConfigValueError(
            f"config.advantage={c.advantage!r} compares samples of a prompt: group_size must be >= 2"
        )
    if c.dynamic_sampling_max_rounds < 0 or (c.dynamic_sampling_max_rounds and c.group_size < 2):
        raise ConfigValueError(
            "config.dynamic_sampling_max_rounds must be >= 0 (0: off), and dynamic sampling needs group_size >= 2 "
            "(a group of one always has equal rewards)"
        )
    if not 0 <= c.overlong_buffer <= c.max_new_tokens or c.overlong_penalty_factor < 0:
        raise ConfigValueError(
            f"config: need 0 <= overlong_buffer <= max_new_tokens ({c.max_new_tokens}) and overlong_penalty_factor "
            f">= 0, got {c.overlong_buffer}, {c.overlong_penalty_factor}"
        )
    if c.rollout_slots < 0 or (c.rollout_slots and c.env):
        raise ConfigValueError("config.rollout_slots must be >= 0 (0: off), and env episodes sample turn by turn (0)")
    if c.rollout_staleness < 0:
        raise ConfigValueError(f"config.rollout_staleness={c.rollout_staleness} must be >= 0 (0: synchronous)")
    _validate_env(c)
    if c.tis_cap != 0 and not c.tis_cap >= 1.0:
        raise ConfigValueError(
            f"config.tis_cap={c.tis_cap}: 0 (off) or >= 1 (a cap below 1 would shrink every on-policy token's "
            "weight; 2 is common)"
        )


def _validate_env(c: ml_collections.ConfigDict) -> None:
    if not c.env:
        return
    from align_jax.envs import ENVS

    one_of(c.env, tuple(ENVS), "env")
    if c.rules or c.rm_workdir:
        raise ConfigValueError(
            f"config.env={c.env!r} rewards the episodes itself: unset config.rules and config.rm_workdir "
            "(--config.rules= --config.rm_workdir=)"
        )
    if c.augment != "none" or c.algorithm != "grpo":
        raise ConfigValueError(
            "config.env works with algorithm='grpo' and augment='none' (the environment writes the chat)"
        )
    if c.env_max_turns < 1 or c.data.seq_len <= c.max_prompt_len:
        raise ConfigValueError(
            "config.env needs env_max_turns >= 1 and data.seq_len (the row: prompt + every turn) > max_prompt_len"
        )


# Settings of the 2025 recipes as this stage spells them (none is a preset: a config applies one with
# `c.update(GRPO_RECIPES["dapo"])` and sets its own overlong_buffer, e.g. a fifth of max_new_tokens as DAPO).
GRPO_RECIPES = {
    # DAPO (Yu et al. 2025): clip-higher, token-level loss, no KL, dynamic sampling, overlong shaping.
    "dapo": dict(
        clip_eps=0.2, clip_eps_high=0.28, normalise="token", kl_mode="none", advantage="grpo",
        advantage_scale="std", dynamic_sampling_max_rounds=3, overlong_penalty_factor=1.0,
    ),
    # Dr. GRPO (Liu et al. 2025): no std in the advantage, a constant length normaliser.
    "dr_grpo": dict(advantage="grpo", advantage_scale="none", normalise="constant"),
    # GSPO (Zheng et al. 2025): the sequence-level ratio and its small clip range.
    "gspo": dict(policy_loss="gspo", normalise="sequence", gspo_clip_eps=3e-4, gspo_clip_eps_high=4e-4),
    # CISPO (MiniMax-M1): the clipped IS weight as a constant, no lower bound, token-level loss.
    "cispo": dict(policy_loss="cispo", clip_eps=1.0, clip_eps_high=0.28, normalise="token"),
}  # fmt: skip


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

"""GRPO: online RL with group-normalised advantages (DeepSeekMath; the Baichuan report's final stage).

Each step's batch is a rollout (align_jax/rollout.py): prompts -> `group_size` samples each from the
current policy -> rewards (rules and/or a trained RM) -> old and reference log-probs, per-token KL ->
advantages; the update is a clipped policy gradient (align_jax/losses/grpo.py). The frozen reference
(init_from) rides in TrainState.frozen.

KL to the reference (`kl_mode`; `grpo.kl_mode` in a pipeline):
  reward  the report's choice: token rewards r_t = -kl_coef * KL_t, plus the score at the last token.
          A token's advantage is the group-normalised score minus kl_coef x the KL still to come in its
          sample (its return's KL part, not normalised with the scores). KL_t is k1, k3, or the exact KL
          over the reference's top-k logits (`kl_estimator = topk`, k = kl_topk, the report's top-500).
  loss    DeepSeekMath: kl_coef * mean k3 (or k1) added to the loss.
  none    no KL term.

PTX (`ptx_coef` > 0): each step also takes a packed batch of SFT chats (`ptx_data`) and adds
ptx_coef x the per-token mean of either the report's KL(policy || original model), exact over the
reference's top-k logits, or plain NLL, on their assistant tokens.

Variants (config keys; formulas in losses/rl.py and losses/advantages.py; recipes' settings in
config/stage_sections.GRPO_RECIPES): `policy_loss` ppo_clip | gspo | cispo; `advantage` grpo (with
advantage_scale std | none) | rloo | reinforce_pp | reinforce_pp_baseline; `normalise` token | sequence |
constant (Dr. GRPO); DAPO's clip-higher (clip_eps_high), dynamic sampling (dynamic_sampling_max_rounds)
and overlong shaping (overlong_buffer, overlong_penalty_factor); truncated importance sampling (tis_cap).
Besides reward, KL and entropy, each step logs ratio, clip_fraction(_low/_high), approx_kl, the groups
with equal rewards (groups_constant; with dynamic sampling groups_dropped and sampling_rounds), the
sampler/trainer log-prob mismatch (logp_mismatch/max, /mean, /kl) and, with tis_cap, tis/weight and
tis/truncated.

PPO (`algorithm = "ppo"`): a value model (init_from's decoder + a fresh scalar head) trained
alongside, per-token rewards with the KL inside, GAE advantages, a clipped value loss.

Prompt rows: {"prompt": str | [messages], ...any other fields the rules read, e.g. "answer"}.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections

from align_jax import rewards
from align_jax.batch import PPO_FIELDS, PTX_FIELDS, PTX_KL_FIELDS, ROLLOUT_FIELDS, TOKEN_FIELDS, BatchSpec
from align_jax.config.sections import ConfigValueError
from align_jax.data.prompts import PromptStream, Streams, prompt_messages
from align_jax.data.sources import open_source
from align_jax.envs import env_factory
from align_jax.lora import model_apply_fn
from align_jax.losses.grpo import PolicyObjective, grpo_loss, ppo_loss
from align_jax.metrics import flops_per_token
from align_jax.models.heads import ScalarModel
from align_jax.models.transformer import Decoder
from align_jax.pas.augment import augmenter
from align_jax.rollout import Rollouts
from align_jax.stages import build, runner
from align_jax.stages.rm import scalar_params
from align_jax.stages.spec import Context, ParamsInit, StageSpec
from align_jax.workdir import resolve_data_path

__all__ = ["batch_spec", "prompt_messages", "run", "spec"]


def batch_spec(g: ml_collections.ConfigDict) -> BatchSpec:
    groups = [TOKEN_FIELDS, ROLLOUT_FIELDS]
    if g.algorithm == "ppo":
        groups.append(PPO_FIELDS)
    if g.ptx_coef:
        groups += [PTX_FIELDS, PTX_KL_FIELDS] if g.ptx_kind == "kl" else [PTX_FIELDS]
    return BatchSpec.of(*groups)


def ppo_params(ctx: Context, value_model: ScalarModel) -> ParamsInit:
    """{policy: init_from, value: init_from's decoder + a fresh scalar head}."""
    policy, value = build.decoder_params(ctx), scalar_params(value_model, int(ctx.config.seed))

    def from_init(params: Any) -> Any:
        # A copy for the value model: the two must not share buffers (the step donates the state).
        decoder = {k: v.copy() for k, v in params.items() if k != "lm_head"}
        return {"policy": params, "value": value.from_init(decoder)}

    def fresh(rng: jax.Array) -> Any:
        return {"policy": policy.fresh(rng), "value": value.fresh(rng)}

    boxed = {"policy": policy.boxed_abstract, "value": value.boxed_abstract}
    return ParamsInit(boxed, fresh, init_from_part="policy", from_init=from_init, reference=True)


def ptx_iterator(config: ml_collections.ConfigDict, tokenizer: Any):
    from align_jax.data.pipeline import make_sft_iterator

    cfg = {
        "train": resolve_data_path(config.ptx_data),
        "seq_len": int(config.data.seq_len),
        "batch_size": int(config.ptx_batch_size),
        "shuffle_seed": int(config.data.shuffle_seed),
    }
    return make_sft_iterator(cfg, tokenizer, split="train")


def eval_rows(config: ml_collections.ConfigDict) -> list[tuple[Any, Any]] | None:
    if not config.data.eval:
        return None
    source = open_source(resolve_data_path(config.data.eval), split=None)
    return source.read(list(range(min(len(source), int(config.eval_prompts)))))


def check_processes(g: ml_collections.ConfigDict) -> None:
    """Run before the workdir is taken (a refused setting leaves none). With several processes, settings
    whose sampling is not multi-process yet are refused, and each process must sample whole groups (an
    equal share of the rollout's prompts)."""
    count = jax.process_count()
    if count == 1:
        return
    # Samplers that place the prompts on the devices themselves (env episodes, the refill engine), sampling
    # in a background thread (its collectives would interleave with the update's), and dynamic sampling
    # (which would move groups between processes).
    unsupported = {
        "env": g.env,
        "rollout_slots": int(g.rollout_slots),
        "rollout_staleness": int(g.rollout_staleness),
        "dynamic_sampling_max_rounds": int(g.dynamic_sampling_max_rounds),
    }
    on = [f"{k}={v!r}" for k, v in unsupported.items() if v]
    if on:
        raise ConfigValueError(f"{', '.join(on)}: not supported with {count} processes yet; run it on one host")
    prompts = int(g.data.batch_size) // int(g.group_size)
    if prompts % count:
        raise ConfigValueError(
            f"config.data.batch_size={g.data.batch_size} / group_size={g.group_size} = {prompts} prompts per rollout "
            f"cannot be shared by {count} processes: make the prompt count a multiple of {count}"
        )


def spec(ctx: Context) -> StageSpec:
    c = g = ctx.config
    objective = PolicyObjective.from_config(g, loss_chunk=c.train.loss_chunk)
    policy_fn = model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder))
    if g.algorithm == "ppo":
        value_model = ScalarModel(ctx.model_cfg, ctx.sharder)
        value_fn = model_apply_fn(value_model)
        params = ppo_params(ctx, value_model)
        loss = functools.partial(ppo_loss, apply_fn=policy_fn, value_fn=value_fn, objective=objective)
    else:
        value_fn = None
        params = build.decoder_params(ctx)
        params.reference = True
        loss = functools.partial(grpo_loss, apply_fn=policy_fn, objective=objective)
    prompts = PromptStream(resolve_data_path(c.data.train), int(c.data.shuffle_seed))
    ptx = ptx_iterator(c, ctx.tokenizer) if g.ptx_coef else None
    rollouts = Rollouts(
        g,
        model_cfg=ctx.model_cfg,
        sharder=ctx.sharder,
        tokenizer=ctx.tokenizer,
        policy_fn=policy_fn,
        reward=None
        if g.env
        else rewards.build_reward(g.rules, json.loads(g.rule_kwargs), g.rm_workdir, float(g.rm_weight)),
        env=env_factory(g.env, max_turns=int(g.env_max_turns)) if g.env else None,
        augment=augmenter(g.augment),
        prompts=prompts,
        ptx=ptx,
        value_fn=value_fn,
        batch_size=int(c.data.batch_size),
        seed=int(c.seed),
    )
    rows = eval_rows(c)
    return StageSpec(
        batch=batch_spec(g),
        loss_fn=loss,
        params=params,
        train_data=Streams(prompts, ptx),
        # The update's FLOPs; rollout time is reported apart (time/rollout_s, time/logprobs_s).
        flops_per_token=functools.partial(flops_per_token, ctx.model_cfg),
        weight_name="tokens",
        next_batch=rollouts.next_batch,
        evaluate=(lambda run, state: rollouts.evaluate(rows, state)) if rows is not None else None,
        summary=lambda: {"rollouts": rollouts.count},
        extra_metrics=lambda: dict(rollouts.metrics),
    )


run = runner.stage(spec, check=lambda config, workdir: check_processes(config))

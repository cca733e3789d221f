"""GRPO: online RL from rule rewards and/or a trained reward model (the report's final preference stage).

    python launch/train.py --config configs/grpo.py:<preset> --workdir DIR --config.init_from=SFT_WORKDIR

The policy and the frozen reference start from init_from. Each step samples group_size responses to
each of batch_size / group_size prompts, scores them (config.rules, e.g. "exact_match:1.0", and/or
config.rm_workdir), normalises returns within each group, and takes a clipped policy-gradient
step. The KL to the reference sits in the token-level reward by default (kl_mode=reward), exact over
the reference's top-k logits (kl_estimator=topk, kl_topk=500), as in the report. Metrics: reward mean
and std (and each rule's), KL, entropy, clip fraction, response length, and the rollout / log-probs /
update time of every step. `--config.algorithm=ppo` runs PPO instead: a value model (init_from's
decoder + a fresh scalar head) trained beside the policy, KL in the per-token reward, GAE advantages,
clipped value loss.

Variants, set by key (none changes a preset; config/stage_sections.GRPO_RECIPES holds DAPO's, Dr. GRPO's,
GSPO's and CISPO's settings for `c.update(...)`):
  policy_loss                ppo_clip (default) | gspo (sequence-level ratio; gspo_clip_eps=3e-4,
                             gspo_clip_eps_high=4e-4; normalise=sequence) | cispo (clipped IS weight as a
                             constant; bounds clip_eps, clip_eps_high)
  advantage                  grpo (default; advantage_scale std | none = Dr. GRPO) | rloo | reinforce_pp |
                             reinforce_pp_baseline
  normalise                  token (default) | sequence | constant (Dr. GRPO: / (samples x max_new_tokens))
  clip_eps_high              DAPO's clip-higher (0: = clip_eps)
  dynamic_sampling_max_rounds  DAPO: extra prompt rounds to replace groups with equal rewards (0: off)
  overlong_buffer            DAPO's overlong shaping over the last N of max_new_tokens (0: off), weight
                             overlong_penalty_factor (1.0)
  tis_cap                    truncated importance sampling of the sampler's log-probs (0: off; e.g. 2)
  rollout_staleness          sample rollout k + s in a background thread while rollout k trains (0: off;
                             set tis_cap with it)
  env, env_max_turns         multi-turn episodes against an environment (align_jax/envs/, e.g. calculator)
                             that is the reward; rows of data.seq_len tokens, environment tokens not trained
Every step also logs the sampler/trainer log-prob mismatch (logp_mismatch/max, /mean, /kl), the clip
fractions (clip_fraction_low/_high) and the share of groups with equal rewards (groups_constant;
groups_dropped and sampling_rounds with dynamic sampling).

Presets:
  tiny       The CPU demo, after `configs/sft.py:tiny` (--config.init_from=runs/sft-demo): the bundled
             RL prompts (align_jax/data/demo/rl_*.jsonl: arithmetic, comparisons, word tasks, each
             with its answer), 16 prompts x 4 samples per step, rewarded for a right answer (exact_match)
             and for a terse one (max_words, at most 3 words): verifiable rules of which the second is
             learnable by a 0.8M-parameter model. Exact match alone is not (run alone, its mean reward
             fell 0.29 -> 0.16 over 80 steps). Measured on a 2-core CPU (~2 min for 80 steps, with eval
             every 20): train reward 0.69 -> 1.30 (steps 5 -> 80); eval reward 0.85 -> 1.22 -> 1.22 -> 1.23
             (steps 20 / 40 / 60 / 80), its max_words part 0.60 -> 0.99 -> 1.0 -> 1.0 while exact match
             holds (0.25 -> 0.23); responses shrink from 6.9 to 2.4 tokens. With the demo reward model
             instead (--config.rules= --config.rm_workdir=runs/rm-demo) the eval reward goes 1.23 ->
             1.84 (steps 40 -> 80). The pipeline (configs/pipeline.py) runs GRPO on prompts with
             verifiable checks (demo:constraints_rl, rule `constraints`) plus the reward model and a PTX term.
  dapo_tiny  `tiny` with DAPO's recipe (GRPO_RECIPES["dapo"]: clip_eps 0.2 / clip_eps_high 0.28, token-level
             loss, no KL, dynamic sampling with up to 3 extra prompt rounds) plus overlong shaping over the
             last 8 of 32 new tokens and two updates per rollout, 60 steps, after `configs/sft.py:tiny`.
             Measured on the shared 2-core CPU (~2.5 min): eval reward 0.77 -> 0.89 -> 1.20 (steps 20 / 40 /
             60; max_words 0.54 -> 1.0, exact match ~0.2 throughout), train reward 0.56 -> 1.22 (steps 5 ->
             60); on second updates 2-8% of tokens clipped low and 1-4% high; dynamic sampling drops 60% of
             the groups early and over 90% once brevity is learnt (every sample of a group then scores alike).
  calculator_tiny  Multi-turn tool use (align_jax/envs/calculator.py), after `configs/sft.py:calculator_tiny`:
                 python launch/train.py --config configs/sft.py:calculator_tiny --workdir runs/sft-calc
                 python launch/train.py --config configs/grpo.py:calculator_tiny --workdir runs/grpo-calc \
                     --config.init_from=runs/sft-calc
             Episodes of up to 3 turns (a `<calc>` call, the tool's answer, the reply) on
             demo:calculator_train, 16 problems x 4 episodes per step, reward 1 for a right final number.
             The SFT chats call the calculator on most kinds of problem but seldom on sums and seat counts
             (align_jax/envs/make_calculator_data.py), which the SFT model then answers by guessing; RL
             finds that calling pays there too. Measured on a 2-core CPU shared with other jobs (~6 min
             for 80 steps; eval: 128 greedy episodes every 20 steps): eval reward 0.59 (the SFT model, the
             same episodes) -> 0.73 -> 0.76 -> 0.81 -> 0.84 (steps 20 / 40 / 60 / 80), turns per eval
             episode 1.72 -> 1.96 -> 2.0 (every problem through one call); sums right 0/23 -> 20/23, seat
             counts 1/14 -> 10/14. Train reward (64 sampled episodes a step, noisy) 0.54 over steps 5-20
             -> 0.75 over steps 40-80; turns 1.67 -> 2.0; KL 0.07-0.17. SFT sees the tool's answer as a
             user turn (the SFT reader has no tool role) and RL sends it as ChatML's `tool` turn: the SFT
             model's eval reward is 0.61 with user turns, so the difference costs little.
  llama3_8b  Llama-3-8B from an SFT workdir, with an RM workdir as the reward (--config.rm_workdir)
             on your prompts (--config.data.train): 8x H100/H200 or TPU v5p-8, mesh fsdp=8, 64 prompts x
             3 samples, 512 new tokens. Estimate, not measured: rollout dominates (decode of 192 x 512
             tokens), then one update of ~192 x 1k tokens, the LM head in 512-position chunks.
             Fit of the update step (launch/plan.py, compiled for the slice; policy + frozen reference):
             v5p-8 60.3 of 95 GiB per chip, plus 6 GiB per chip of the sampler's KV cache; v5p-128 with
             --config.train.microbatches=3 (7.2 GiB); v5e-16 needs microbatches dividing 16-row shares
             (4: 16.4 of 16 GiB, 12: 17.1): it does not fit there (docs/benchmarks.md).
  qwen2_7b   Qwen2/2.5-7B, same layout as llama3_8b. Fit: v5p-8 57.2 of 95 GiB per chip; v5e-16 with
             --config.train.microbatches=4 (15.7 of 16 GiB).
  llama3_70b Llama-3(.1)-70B: 64 H100s or a TPU v5p-128, mesh fsdp=16 x tensor=4 (x data for the rest),
             128 prompts x 3 samples, 6 update microbatches (64 rows: 4 per fsdp shard), remat one unit per
             2 layers. Fit (launch/plan.py): v5p-128 38.3 of 95 GiB per chip, plus 1.9 GiB of KV cache.
"""

from align_jax.config import base_config
from align_jax.config.stage_sections import GRPO_RECIPES


def get_config(arg: str = "tiny"):
    c = base_config("grpo")
    c.data.train = "demo:rl_train"
    c.data.eval = "demo:rl_eval"
    if arg in ("tiny", "dapo_tiny"):
        c.model.dtype = "float32"
        c.model.scan_unroll = 4
        c.data.update(seq_len=96, batch_size=64)
        c.update(group_size=4, max_prompt_len=64, max_new_tokens=32, temperature=1.0, kl_coef=0.02)
        # Per-sequence normalisation: with token-level sums, long wrong samples outweigh short right ones
        # and a tiny policy drifts toward answering nothing (measured: length 8 -> 1 in 30 steps at lr 1e-3).
        # Exact match alone is too sparse for this model to learn from; the brevity rule gives every group a
        # signal it can follow, and exact match keeps it answering rather than saying anything short.
        c.update(rules="exact_match:1.0,max_words:1.0", rule_kwargs='{"max_words": {"limit": 3}}')
        c.update(eval_prompts=96, normalise="sequence")
        c.optim.update(lr=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0)
        c.train.update(steps=80, log_every=5, eval_every=20, ckpt_every=40)
        if arg == "dapo_tiny":
            # DAPO's recipe (clip-higher, token-level loss, no KL, dynamic sampling) with overlong shaping
            # over the last quarter of the 32 new tokens.
            c.update(GRPO_RECIPES["dapo"])
            # Two updates per rollout, so the ratio moves off 1 and the asymmetric clip acts.
            c.update(overlong_buffer=8, updates_per_rollout=2)
            c.train.steps = 60
    elif arg == "calculator_tiny":
        c.data.update(train="demo:calculator_train", eval="demo:calculator_eval")
        c.model.dtype = "float32"
        c.model.scan_unroll = 4
        # A row is the prompt (system + problem: <= 98 tokens with the calculator BPE, kept whole so the
        # chat is the one SFT saw), a call, the tool's answer and the final reply.
        c.data.update(seq_len=192, batch_size=64)
        c.update(env="calculator", env_max_turns=3, rules="", rule_kwargs="{}")
        c.update(group_size=4, max_prompt_len=112, max_new_tokens=24, temperature=1.0, kl_coef=0.02)
        c.update(eval_prompts=128, normalise="sequence")
        c.optim.update(lr=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0)
        c.train.update(steps=80, log_every=5, eval_every=20, ckpt_every=40)
    elif arg in ("llama3_8b", "qwen2_7b", "llama3_70b"):
        c.mesh.update(data=1, fsdp=-1)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.data.update(seq_len=1024, batch_size=192)
        c.update(group_size=3, max_prompt_len=512, max_new_tokens=512, kl_coef=0.05, rules="", rm_weight=1.0)
        c.optim.update(lr=5e-7, warmup_steps=10, schedule="constant", weight_decay=0.0)
        # The log-probs, the reference's top-k and the update read the LM head 512 positions at a time:
        # a 24-row microbatch's 128k-vocab fp32 logits would be 12.6 GB, a chunk is 6.3 GB / 2.
        c.train.update(steps=500, microbatches=8, loss_chunk=512, log_every=1, eval_every=50, ckpt_every=50)
        if arg == "llama3_70b":
            c.mesh.update(data=-1, fsdp=16, tensor=4)
            c.model.layers_per_unit = 2
            c.data.batch_size = 384
            c.train.microbatches = 6  # 384 rows in 64-row microbatches: 4 per fsdp shard
    else:
        raise ValueError(
            f"configs/grpo.py: unknown preset {arg!r}; presets: tiny, dapo_tiny, calculator_tiny, llama3_8b, "
            "qwen2_7b, llama3_70b"
        )
    c.lock()
    return c

"""The whole Baichuan alignment pipeline in one run: SFT -> PAS -> RM -> DPO and GRPO -> merge -> eval.

    python launch/train.py --config configs/pipeline.py:<preset> --workdir DIR [--config.<stage>.<key>=value ...]

`config.stages` lists the stages in order; each runs in DIR/<stage> with the settings of its own
config (config.sft is a whole configs/sft.py config, and so on), is resumable, and is skipped when it
has already finished (align_jax/stages/pipeline.py). `stage:NAME` values point at another stage's
workdir. The merge is Model Stock (the report's best) of the DPO and GRPO models around the SFT model;
the eval stage measures every model the same way and writes DIR/report/ (report.md, report.json, and
PNGs of the training curves and of each metric across stages).

Presets:
  tiny       The CPU demo: a tiny tokenizer and a 0.8M-parameter model trained from scratch on the
             bundled data (align_jax/data/demo), then the PAS model (template teacher + rule judge, the
             offline stand-in for a teacher LLM), the reward model, DPO (+RPO), GRPO (verifiable
             checks + reward model + PTX), Model Stock, and the evaluation of base / sft / dpo / grpo /
             merge. 2-core CPU: ~8.7 min (13 min beside other jobs), 2.7 GB peak memory.
             Measured: constraint following (prompt level) 0.06 / 0.875 / 0.875 / 0.93 / 0.89 and mean
             reward under the RM -2.17 / 0.82 / 0.74 / 1.28 / 0.84 for base / sft / dpo / grpo / merge;
             win rate against SFT: DPO 0.64, GRPO 0.59 (README.md's results block is generated from a
             recorded run and checked by CI).
  llama3_8b  The same stages for Llama-3-8B on your data (--config.init_from=/models/Meta-Llama-3-8B,
             --config.sft.data.train=..., --config.rm.data.train=..., --config.dpo.data.train=...,
             --config.grpo.data.train=PROMPTS, --config.pas.prompts=PROMPTS,
             --config.pas.teacher=/models/TEACHER_HF_DIR, --config.pas.judge=same).
             8x H100/H200 or a TPU v5p-8; each stage's time is in its own config's docstring.
"""

import importlib.util
import os

import ml_collections


def _stage_preset(stage: str, preset: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{stage}.py")
    spec = importlib.util.spec_from_file_location(f"align_jax_config_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "llama3_8b"):
        raise ValueError(f"configs/pipeline.py: unknown preset {arg!r}; presets: tiny, llama3_8b")
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.stages = "sft,pas,rm,dpo,grpo,merge,eval"
    c.init_from = ""  # the base model (an HF directory); empty: SFT trains the tiny model from scratch

    for stage in ("sft", "pas", "rm", "dpo", "grpo"):
        c[stage] = _stage_preset(stage, arg)
    with c.sft.unlocked():
        c.sft.init_from = ""  # takes config.init_from
    for stage in ("pas", "rm", "dpo", "grpo"):
        c[stage].init_from = "stage:sft"
    c.grpo.rm_workdir = "stage:rm"
    if arg == "tiny":
        # SFT stops at 100 steps (the standalone demo trains 300, and then passes 99% of the demo's
        # constraint checks): the preference stages get something left to improve.
        c.sft.train.update(steps=100, eval_every=50, ckpt_every=50)
        # DPO with an NLL term on the chosen answers (RPO): plain DPO also lowers their likelihood, and the
        # 0.8M-parameter policy then degrades into repeated tokens on some prompts.
        c.dpo.rpo_alpha = 1.0
        # GRPO on prompts with verifiable checks (the eval set's kinds, none of its prompts): reward = the
        # share of checks passed + the reward model, KL to the SFT model in the token reward, and the
        # report's PTX term (KL to the SFT model on SFT chats) against forgetting what RL does not sample.
        c.grpo.data.update(train="demo:constraints_rl", eval="demo:constraints_demo")
        # The checks weigh most: with the reward model at full weight the policy chases its preferences
        # (longer lists of real words) at the cost of the list-length check (measured 0.56 -> 0.28).
        c.grpo.update(rules="constraints:4.0", rm_weight=0.25, ptx_coef=0.1, ptx_data="demo:sft_train")
        c.grpo.train.steps = 120

    c.merge = ml_collections.ConfigDict()
    c.merge.method = "model_stock"  # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp | model_stock
    c.merge.base = "stage:sft"  # the anchor (task arithmetic, TIES, DARE, Model Stock)
    c.merge.models = "stage:dpo,stage:grpo"
    c.merge.weights = ""  # comma-separated; empty: equal
    c.merge.t = 0.5  # slerp
    c.merge.scale = 1.0  # task arithmetic, ties, dare
    c.merge.density = 0.5  # ties, dare_ties
    c.merge.drop_rate = 0.3  # dare
    c.merge.seed = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.models = "base,sft,dpo,grpo,merge"
    c.eval.reference = "sft"  # win rates are against this model
    c.eval.rm = "stage:rm"
    c.eval.pas = "stage:pas"  # also score constraint following on PAS-augmented prompts ("" to skip)
    c.eval.constraints = "demo"  # a prompt set: demo | general | a JSONL path
    c.eval.sft_eval = "demo:sft_eval"  # perplexity
    c.eval.pref_eval = "demo:pref_eval"  # the RM's held-out pair accuracy
    c.eval.reward_prompts = "demo:rl_eval"  # reward and win rate of greedy responses to these prompts
    c.eval.num_reward_prompts = 96
    c.eval.max_new_tokens = 48
    # IFEval (align_jax/eval/ifeval.py): its own input format, a JSONL path (e.g. Google's input_data.jsonl)
    # or "demo" (36 prompts written here, every instruction id); "" to skip. Responses as long as IFEval
    # runs allow them.
    c.eval.ifeval = "demo"
    c.eval.ifeval_max_new_tokens = 1280
    c.eval.limit = 0  # constraint prompts to use (0: all)
    c.eval.seq_len = 256
    c.eval.batch_size = 16
    c.eval.ppl_batches = 8  # 0: the whole held-out set
    # The models' dtype during eval: float32 for the tiny CPU demo, bfloat16 for real models.
    c.eval.dtype = "float32"
    # The one mesh the policy, reference, RM and PAS model share during eval: every local device on fsdp,
    # so each holds 1/n of every model's weights (an 8B pipeline's four models fit); e.g.
    # --config.eval.mesh.tensor=2 for tensor parallelism. Axis sizes as in a training stage's config.mesh.
    c.eval.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1, "expert": 1})

    if arg == "tiny":
        # The 0.8M-parameter models answer in a sentence or two; a long budget would only time the rows that
        # never stop.
        c.eval.ifeval_max_new_tokens = 128
    if arg == "llama3_8b":
        c.eval.constraints = "general"
        c.eval.max_new_tokens = 512
        c.eval.seq_len = 4096
        c.eval.ppl_batches = 0
        c.eval.dtype = "bfloat16"
        for key in ("sft_eval", "pref_eval", "reward_prompts"):
            c.eval[key] = ""  # your held-out files: --config.eval.sft_eval=... etc.
    c.lock()
    return c

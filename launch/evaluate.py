"""Evaluates one model (a stage workdir or an HF directory) and prints its metrics as one JSON line.

    python launch/evaluate.py --model runs/sft-demo --constraints demo --sft_eval demo:sft_eval
    python launch/evaluate.py --model runs/dpo-demo --constraints demo --rm runs/rm-demo --reference runs/sft-demo
    python launch/evaluate.py --model /models/Llama-3.2-1B-Instruct --constraints general --out eval.json
    python launch/evaluate.py --model /models/Llama-3.2-1B-Instruct --ifeval input_data.jsonl --out eval.json

--constraints takes a prompt-set path or "demo" / "general" (the bundled sets, align_jax/eval/data).
--rm adds the mean reward of the model's greedy responses; --reference (needs --rm) adds the win rate
against another model. Their prompts are --reward_prompts (JSONL rows with a "prompt" or "messages":
demo:pref_eval, demo:rl_eval, a prompt set ...), by default the constraint set's prompts.
--ifeval takes an IFEval input file (its own JSONL: key, prompt, instruction_id_list, kwargs) or "demo"
(a small bundled set); responses get --ifeval_max_new_tokens (1280, as IFEval runs use), the other
evals --max_new_tokens. Metrics: ifeval/prompt_strict, inst_strict, prompt_loose, inst_loose, and per id.
--out also writes the metrics and a few constraint examples as JSON (atomically); with --ifeval, the
responses also go to --ifeval_out (default: beside --out, as OUT_STEM.ifeval_responses.jsonl) in IFEval's
output format, {"prompt", "response"} per line, for the official scorer to cross-check.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from align_jax.host import tune_host_allocator

_MODEL = flags.DEFINE_string("model", None, "a stage workdir or an HF directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step of a workdir (default: latest)")
_CONSTRAINTS = flags.DEFINE_string("constraints", None, "prompt set: a JSONL path, 'demo' or 'general'")
_IFEVAL = flags.DEFINE_string("ifeval", None, "IFEval input: a JSONL path in IFEval's format, or 'demo'")
_IFEVAL_MAX_NEW = flags.DEFINE_integer("ifeval_max_new_tokens", 1280, "tokens generated per IFEval response")
_IFEVAL_OUT = flags.DEFINE_string("ifeval_out", None, "IFEval responses as {prompt, response} JSONL (see --out)")
_SFT_EVAL = flags.DEFINE_string("sft_eval", None, "held-out chats for perplexity: a path or demo:NAME")
_RM = flags.DEFINE_string("rm", None, "a reward-model (rm stage) workdir")
_REFERENCE = flags.DEFINE_string("reference", None, "a model to compare against under --rm (win rate)")
_REWARD_PROMPTS = flags.DEFINE_string("reward_prompts", None, "prompts for --rm (default: the constraint set's)")
_OUT = flags.DEFINE_string("out", None, "also write the metrics and examples here (JSON)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per response")
_LIMIT = flags.DEFINE_integer("limit", None, "at most this many constraint, IFEval and reward prompts")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "packed row length for --sft_eval")
_BATCH = flags.DEFINE_integer("batch_size", 8, "packed rows per batch for --sft_eval")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library logs at INFO, and tracebacks for input errors")
flags.mark_flags_as_required(["model"])


def _write_ifeval_responses(details: dict) -> None:
    """Moves the IFEval responses out of `details` (hundreds of long texts do not belong in the metrics
    JSON) into their own file in IFEval's output format, and notes its path there."""
    rows, responses = details.pop("ifeval/rows", None), details.pop("ifeval/responses", None)
    path = _IFEVAL_OUT.value
    if not path and _OUT.value:
        path = os.path.splitext(_OUT.value)[0] + ".ifeval_responses.jsonl"
    if rows is not None and path:
        from align_jax.eval.ifeval import write_responses

        write_responses(path, rows, responses)
        details["ifeval_responses"] = path


def main(argv) -> int:
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    with cli.user_errors(verbose):
        from align_jax.chat import ChatModel
        from align_jax.eval.constraints import load_prompt_set
        from align_jax.eval.reward import RewardScorer
        from align_jax.eval.suite import evaluate_model
        from align_jax.eval.winrate import load_prompts

        if _IFEVAL_OUT.value and not _IFEVAL.value:
            raise SystemExit("--ifeval_out needs --ifeval: it holds the IFEval responses")
        if _REFERENCE.value and not _RM.value:
            raise SystemExit("--reference needs --rm: the win rate is measured with a reward model")
        model = ChatModel.load(_MODEL.value, step=_STEP.value)
        scorer = RewardScorer.load(_RM.value) if _RM.value else None
        reference = ChatModel.load(_REFERENCE.value) if _REFERENCE.value else None
        prompts = None
        if scorer is not None:
            if _REWARD_PROMPTS.value:
                prompts = load_prompts(_REWARD_PROMPTS.value, _LIMIT.value)
            elif _CONSTRAINTS.value:
                prompts = [r["prompt"] for r in load_prompt_set(_CONSTRAINTS.value, _LIMIT.value)]
            else:
                raise SystemExit("--rm needs prompts: give --reward_prompts or --constraints")
        details: dict = {}
        metrics = evaluate_model(
            model,
            constraints=_CONSTRAINTS.value,
            ifeval=_IFEVAL.value,
            ifeval_max_new_tokens=_IFEVAL_MAX_NEW.value,
            sft_eval=_SFT_EVAL.value,
            scorer=scorer,
            reward_prompts=prompts,
            reference=reference,
            max_new_tokens=_MAX_NEW.value,
            limit=_LIMIT.value,
            seq_len=_SEQ_LEN.value,
            batch_size=_BATCH.value,
            details=details,
        )
        _write_ifeval_responses(details)
        if _OUT.value:
            tmp = _OUT.value + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"model": _MODEL.value, "metrics": metrics, **details}, f, indent=2, ensure_ascii=False)
            os.replace(tmp, _OUT.value)
        print(json.dumps(metrics))
        return 0


if __name__ == "__main__":
    from align_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)

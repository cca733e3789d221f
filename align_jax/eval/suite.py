"""One evaluation of one model: every configured measurement, as a flat dict of metric name -> float.
The pipeline's eval stage calls it once per stage checkpoint; `launch/evaluate.py` from the shell.

Metric names:
  constraints/prompt_acc, constraints/instruction_acc   instruction following (constraints.py)
  constraints/check/<name>, constraints/category/<c>     the same per check name and per row category
  ifeval/prompt_strict, ifeval/inst_strict, ifeval/prompt_loose, ifeval/inst_loose   IFEval (ifeval.py)
  ifeval/strict/<instruction id>, ifeval/loose/<instruction id>                     the same per instruction
  nll, ppl, token_acc                                    held-out SFT chats (perplexity.py)
  reward/mean, reward/std                                greedy responses under the reward model
  winrate/vs_reference, winrate/margin, reward/reference_mean   the same against a reference model
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from align_jax.eval.constraints import Prompt, evaluate_constraints
from align_jax.eval.ifeval import DEFAULT_MAX_NEW_TOKENS, evaluate_ifeval
from align_jax.eval.perplexity import perplexity
from align_jax.eval.winrate import compare, rewards

Messages = list[dict[str, str]]


def evaluate_model(
    model: Any,
    *,
    constraints: str | None = None,
    ifeval: str | None = None,
    ifeval_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sft_eval: str | None = None,
    scorer: Any = None,
    reward_prompts: Sequence[Prompt] | None = None,
    reference: Any = None,
    augment: Callable[[Messages], Messages] | None = None,
    max_new_tokens: int = 64,
    limit: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    ppl_batches: int | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluates `model` (a ChatModel) on what is given, skipping the rest:

    constraints     a prompt set (path, "demo" or "general"): greedy responses, checked
    ifeval          an IFEval input file (path or "demo"): greedy responses of up to
                    `ifeval_max_new_tokens` tokens, scored as IFEval does (strict and loose)
    sft_eval        held-out SFT chats (path or demo:NAME): nll / ppl of the assistant tokens, packed into
                    `batch_size` rows of `seq_len` (the first `ppl_batches` batches when given)
    scorer + reward_prompts       mean reward of the greedy responses under a RewardScorer
    ... + reference               win rate against the reference model's greedy responses

    `augment` rewrites each prompt before `model` generates (PAS); the checks and the reward model see
    the original prompt, and the reference model never sees an augmented one. `limit` caps the number
    of constraint, IFEval and reward prompts. `details`, when given, receives the non-numeric results
    (the constraint examples; the IFEval rows and responses, for ifeval.write_responses)."""
    if reference is not None and scorer is None:
        raise ValueError("evaluate_model: a reference model needs a scorer (reward model) for the win rate")
    if scorer is not None and not reward_prompts:
        raise ValueError("evaluate_model: a scorer needs reward_prompts to generate responses for")
    out: dict[str, float] = {}
    if constraints:
        scores = evaluate_constraints(model, constraints, max_new_tokens=max_new_tokens, limit=limit, augment=augment)
        out["constraints/prompt_acc"] = scores["prompt_acc"]
        out["constraints/instruction_acc"] = scores["instruction_acc"]
        # Sample counts: the report shows each metric with the n it was measured on.
        out["constraints/n_prompts"] = float(scores["n_prompts"])
        out["constraints/n_instructions"] = float(scores["n_instructions"])
        out.update({f"constraints/check/{k}": v for k, v in scores["per_check"].items()})
        out.update({f"constraints/category/{k}": v for k, v in scores["per_category"].items()})
        if details is not None:
            details["constraints/examples"] = scores["examples"]
    if ifeval:
        out.update(_ifeval_metrics(model, ifeval, ifeval_max_new_tokens, limit, augment, details))
    if sft_eval:
        ppl = perplexity(
            model.cfg,
            model.params,
            model.tokenizer,
            sft_eval,
            seq_len=seq_len,
            batch_size=batch_size,
            limit_batches=ppl_batches,
            sharder=model.sharder,
        )
        out.update(nll=ppl["nll"], ppl=ppl["ppl"], token_acc=ppl["accuracy"])
        out["ppl/tokens"] = float(ppl["tokens"])
    if scorer is not None:
        prompts = list(reward_prompts)[:limit] if limit is not None else list(reward_prompts)
        mine = rewards(model, scorer, prompts, max_new_tokens=max_new_tokens, augment=augment)
        out["reward/mean"], out["reward/std"] = float(mine.mean()), float(mine.std())
        out["reward/n"] = float(len(mine))  # the win rate is over the same prompts
        if reference is not None:
            theirs = rewards(reference, scorer, prompts, max_new_tokens=max_new_tokens)
            cmp = compare(mine, theirs)
            out["winrate/vs_reference"] = cmp["win_rate"]
            out["winrate/margin"] = cmp["margin"]
            out["reward/reference_mean"] = cmp["reference_reward"]
    return {k: float(v) for k, v in out.items()}


def _ifeval_metrics(
    model: Any,
    path: str,
    max_new_tokens: int,
    limit: int | None,
    augment: Callable[[Messages], Messages] | None,
    details: dict[str, Any] | None,
) -> dict[str, float]:
    """IFEval's four accuracies, its counts, and each instruction id's strict and loose accuracy."""
    scores = evaluate_ifeval(model, path, max_new_tokens=max_new_tokens, limit=limit, augment=augment)
    out = {f"ifeval/{k}": float(scores[k]) for k in ("prompt_strict", "inst_strict", "prompt_loose", "inst_loose")}
    out["ifeval/n_prompts"] = float(scores["n_prompts"])
    out["ifeval/n_instructions"] = float(scores["n_instructions"])
    for mode in ("strict", "loose"):
        out.update({f"ifeval/{mode}/{k}": v for k, v in scores["per_id"][mode].items()})
    if details is not None:
        details["ifeval/rows"], details["ifeval/responses"] = scores["rows"], scores["responses"]
    return out

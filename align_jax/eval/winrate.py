"""Rewards and win rates of greedy responses under a trained reward model.

    scorer = RewardScorer.load("runs/rm-demo")
    mean_reward(ChatModel.load("runs/dpo-demo"), scorer, prompts)                 # -> {"mean": .., "std": ..}
    win_rate(ChatModel.load("runs/dpo-demo"), ChatModel.load("runs/sft-demo"), scorer, prompts)

A policy wins a prompt when the RM gives its response the higher reward; a tie (the same reward, as
when both models answer alike) counts half, so two identical models score exactly 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from align_jax.data.sources import iter_jsonl
from align_jax.eval.constraints import Prompt, as_messages

Messages = list[dict[str, str]]


class TextModel(Protocol):
    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int = ..., temperature: float = ...
    ) -> list[str]: ...


class Scorer(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray: ...


def responses(
    model: TextModel,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    augment: Callable[[Messages], Messages] | None = None,
) -> list[str]:
    """Greedy responses; `augment` rewrites each prompt's messages before generation (the reward model
    still sees the original prompt)."""
    messages = [as_messages(p) for p in prompts]
    if augment is not None:
        messages = [augment(m) for m in messages]
    return model.generate(messages, max_new_tokens=max_new_tokens, temperature=0.0)


def rewards(
    model: TextModel,
    scorer: Scorer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    augment: Callable[[Messages], Messages] | None = None,
) -> np.ndarray:
    """[N] float: the reward of `model`'s greedy response to each prompt."""
    answers = responses(model, prompts, max_new_tokens=max_new_tokens, augment=augment)
    return np.asarray(scorer.score([as_messages(p) for p in prompts], answers), np.float64)


def mean_reward(
    model: TextModel,
    scorer: Scorer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    augment: Callable[[Messages], Messages] | None = None,
) -> dict[str, float]:
    """Mean and std of the rewards of `model`'s greedy responses, and the prompt count."""
    if not prompts:
        raise ValueError("mean_reward: no prompts")
    r = rewards(model, scorer, prompts, max_new_tokens=max_new_tokens, augment=augment)
    return {"mean": float(r.mean()), "std": float(r.std()), "n": float(len(r))}


def compare(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> dict[str, float]:
    """Win rate (ties count half), each side's mean reward and the mean margin of two reward arrays."""
    p, r = np.asarray(policy_rewards, np.float64), np.asarray(reference_rewards, np.float64)
    if p.shape != r.shape or p.ndim != 1 or not len(p):
        raise ValueError(f"need two equal, non-empty 1-d reward arrays; got shapes {p.shape} and {r.shape}")
    wins = np.where(p > r, 1.0, np.where(p == r, 0.5, 0.0))
    return {
        "win_rate": float(wins.mean()),
        "policy_reward": float(p.mean()),
        "reference_reward": float(r.mean()),
        "margin": float((p - r).mean()),
        "n": float(len(p)),
    }


def win_rate(
    policy: TextModel,
    reference: TextModel,
    scorer: Scorer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    augment: Callable[[Messages], Messages] | None = None,
) -> dict[str, float]:
    """Greedy responses of both models to each prompt, scored by `scorer`: the policy's win rate over
    the reference (ties 1/2), both mean rewards, and the mean margin (policy minus reference).
    `augment`, when given, applies to the policy's prompts only."""
    if not prompts:
        raise ValueError("win_rate: no prompts")
    p = rewards(policy, scorer, prompts, max_new_tokens=max_new_tokens, augment=augment)
    r = rewards(reference, scorer, prompts, max_new_tokens=max_new_tokens)
    return compare(p, r)


def load_prompts(path: str, limit: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file whose rows have a `prompt` (a string or messages: preference rows,
    RL prompts, constraint prompt sets) or `messages` (a chat, cut before its last assistant turn)."""
    from align_jax.workdir import resolve_data_path

    path = resolve_data_path(path)
    out: list[Prompt] = []
    for where, row in iter_jsonl(path):
        if isinstance(row.get("prompt"), str | list):
            out.append(row["prompt"])
        elif isinstance(row.get("messages"), list):
            messages = list(row["messages"])
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
            if not messages:
                raise ValueError(f"{where}, field 'messages': no turn before the assistant's")
            out.append(messages)
        else:
            raise ValueError(f"{where}: expected a 'prompt' (string or messages) or 'messages' field")
        if limit is not None and len(out) >= limit:
            break
    return out

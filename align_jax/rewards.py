"""Rewards for online RL: rule functions from an explicit registry, a trained reward model, and weighted
sums of both.

A reward function scores a batch of sampled responses: `fn(prompts, responses, rows) -> float32 [N]`,
where `rows` are the prompt rows the samples came from (a rule can read fields such as `answer`).

    reward = build_reward("exact_match:1.0,length_penalty:1.0", rule_kwargs={"length_penalty": {"max_chars": 80}},
                          rm_workdir="runs/rm-demo", rm_weight=0.5)
    total, parts = reward(prompts, responses, rows)     # parts: {name: [N]} for the metrics

Rules (register more with `@register("name")`; the registry is the list of what a config may name):
  exact_match     1 if the row's `answer` appears in the response as a whole word (case-insensitive unless
                  case_sensitive=True; the demo's "Answer in capital letters" prompts set it), else 0
  format          1 if the response matches `pattern` (a regular expression, re.search), else 0
  length_penalty  -per_char x (characters beyond max_chars)
  max_words       1 if the response has at most `limit` words, else 0
  capitals        for prompts that ask for capital letters: 1 if the response has no lower-case letter,
                  else 0; other prompts: 1 (the constraint does not apply)
  constraints     the share of the row's verifiable `checks` (align_jax/eval/constraints.py, as in the
                  eval prompt sets; e.g. demo:constraints_rl) the response passes; rows without checks: 0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Prompt = str | Sequence[Mapping[str, str]]
RewardFn = Callable[[Sequence[Prompt], Sequence[str], Sequence[Mapping[str, Any]]], np.ndarray]

RULES: dict[str, Callable[..., RewardFn]] = {}


def register(name: str):
    """Adds a rule factory `factory(**kwargs) -> RewardFn` to the registry under `name`."""

    def add(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in RULES:
            raise ValueError(f"reward rule {name!r} is registered already")
        RULES[name] = factory
        return factory

    return add


def last_user_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


@register("exact_match")
def exact_match(field: str = "answer", case_sensitive: bool = False) -> RewardFn:
    def fn(prompts, responses, rows):
        out = np.zeros(len(responses), np.float32)
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            if field not in row:
                raise KeyError(f"exact_match: prompt row {i} has no {field!r} field (keys: {sorted(row)})")
            answer = str(row[field])
            flags = 0 if case_sensitive else re.IGNORECASE
            # A whole word: "38" matches "is 38." but not "138" or "3.8".
            out[i] = float(re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)", response, flags) is not None)
        return out

    return fn


@register("format")
def format_match(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def fn(prompts, responses, rows):
        return np.asarray([float(compiled.search(r) is not None) for r in responses], np.float32)

    return fn


@register("length_penalty")
def length_penalty(max_chars: int = 200, per_char: float = 0.01) -> RewardFn:
    def fn(prompts, responses, rows):
        return np.asarray([-per_char * max(0, len(r) - max_chars) for r in responses], np.float32)

    return fn


@register("max_words")
def max_words(limit: int = 50) -> RewardFn:
    def fn(prompts, responses, rows):
        return np.asarray([float(len(r.split()) <= limit) for r in responses], np.float32)

    return fn


@register("capitals")
def capitals(trigger: str = "capital letters") -> RewardFn:
    def fn(prompts, responses, rows):
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            asked = trigger.lower() in last_user_text(prompt).lower()
            out.append(float(not asked or not any(c.islower() for c in response)))
        return np.asarray(out, np.float32)

    return fn


@register("constraints")
def constraints() -> RewardFn:
    """The share of a prompt row's verifiable checks (its "checks" list, as in the eval prompt sets:
    align_jax/eval/constraints.py) that a response passes: an IFEval-style rule reward. Rows without
    checks get 0, which under group normalisation is no signal either way."""
    from align_jax.eval.constraints import run_checks, validate_row

    def fn(prompts, responses, rows):
        out = np.zeros(len(responses), np.float32)
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            if row.get("checks"):
                checked = validate_row({"prompt": row["prompt"], "checks": row["checks"]}, f"prompt row {i}")
                passed = run_checks(checked, response)
                out[i] = sum(passed) / len(passed)
        return out

    return fn


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """ "exact_match:1.0,format:0.2" -> [("exact_match", 1.0), ("format", 0.2)]; a bare name weighs 1."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in RULES:
            raise ValueError(f"unknown reward rule {name!r} in {spec!r}; registered rules: {sorted(RULES)}")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward rule {name!r}: weight {weight!r} is not a number") from None
    return out


class Reward:
    """A weighted sum of reward functions; calling it gives (total [N], {name: [N]})."""

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]]):
        if not parts:
            raise ValueError("no reward: name at least one rule or a reward model")
        self.parts = list(parts)

    def __call__(self, prompts, responses, rows) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        values = {name: np.asarray(fn(prompts, responses, rows), np.float32) for name, _, fn in self.parts}
        total = sum(w * values[name] for name, w, _ in self.parts)
        return np.asarray(total, np.float32), values


def reward_model(workdir: str, batch_size: int = 8) -> RewardFn:
    """A trained rm stage's reward of (prompt, response)."""
    from align_jax.eval.reward import RewardScorer

    scorer = RewardScorer.load(workdir, batch_size=batch_size)

    def fn(prompts, responses, rows):
        return scorer.score(list(prompts), list(responses))

    return fn


def build_reward(
    rules: str = "",
    rule_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    rm_workdir: str = "",
    rm_weight: float = 1.0,
) -> Reward:
    """The reward a config describes: rules by name (with their kwargs), plus a reward model."""
    rule_kwargs = dict(rule_kwargs or {})
    unknown = sorted(set(rule_kwargs) - set(RULES))
    if unknown:
        raise ValueError(f"keyword arguments for unknown reward rules {unknown}; registered: {sorted(RULES)}")
    parts = [(name, w, RULES[name](**dict(rule_kwargs.get(name, {})))) for name, w in parse_spec(rules)]
    if rm_workdir:
        parts.append(("reward_model", float(rm_weight), reward_model(rm_workdir)))
    return Reward(parts)

"""The environment interface of multi-turn and tool rollouts (align_jax/env_rollout.py runs them).

An `Environment` runs ONE episode: `reset(row)` gives the initial chat for a prompt row, then after every
assistant turn `step(messages)` reads the chat so far (its last message is the model's reply, as text)
and answers with a `StepResult`: the messages it adds (a tool result, a user follow-up), the reward
earned by this step, and whether the episode is over. The episode's reward is the sum of its steps'.
The rollout makes one instance per episode (a factory: `lambda: CalculatorEnv()`), so an environment
may keep per-episode state (the row's answer) between `reset` and `step`.

Roles. An environment answers as role "tool" (a tool's output) or "user" (a follow-up from the user).
Not every chat template has a tool role: templates that raise on it, or silently drop it (Qwen2.5-style
templates that render only system/user/assistant), would lose the tool output. The rollout probes the
template once (`tool_role`) and, where "tool" does not render, sends tool messages as "user" turns (and
logs that once per template). The environment itself always sees its own messages as it wrote them.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jinja2

Message = dict[str, str]
ENV_ROLES = ("tool", "user")
_PROBE = "align-jax-tool-role-probe-7f3a"
_WARNED: set[str] = set()


class StepResult(NamedTuple):
    """What the environment answers to one assistant turn."""

    messages: list[Message]  # appended to the chat (roles in ENV_ROLES); ignored once done
    reward: float  # earned by this step; the episode's reward is the sum over its steps
    done: bool  # the episode is over: nothing more is sampled


class Environment(abc.ABC):
    """One episode of a multi-turn task. Subclasses set `max_turns` (assistant turns per episode: the
    rollout ends the episode after that many, whatever `step` says) and implement `reset` and `step`."""

    max_turns: int = 4

    @abc.abstractmethod
    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        """The initial chat for a prompt row (ends with a user turn; the model writes next)."""

    @abc.abstractmethod
    def step(self, messages: Sequence[Message]) -> StepResult:
        """Reacts to the chat whose last message is the model's latest assistant turn."""


def check_step(result: StepResult, env: Environment) -> StepResult:
    """The step's result as a StepResult (a plain 3-tuple is accepted), or a clear error for something the
    rollout cannot render."""
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"{type(env).__name__}.step returned {type(result).__name__}, not a StepResult")
    result = StepResult(list(result[0]), float(result[1]), bool(result[2]))
    for m in result.messages:
        if not isinstance(m, Mapping) or m.get("role") not in ENV_ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{type(env).__name__}.step returned the message {m!r}: environment messages need a role in "
                f"{ENV_ROLES} and string content"
            )
    return result


def tool_role(tokenizer: Any) -> str:
    """The role tool messages render as: "tool" where the chat template renders their content, else "user"."""
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": _PROBE},
    ]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ok = isinstance(text, str) and _PROBE in text
    except jinja2.TemplateError:
        ok = False
    if ok:
        return "tool"
    key = str(getattr(tokenizer, "chat_template", ""))
    if key not in _WARNED:
        _WARNED.add(key)
        logging.warning(
            "the chat template of %r has no 'tool' role (it raises on it or drops it): environment tool "
            "messages are sent to the model as 'user' turns",
            getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        )
    return "user"


def as_rendered(messages: Sequence[Message], role_for_tool: str) -> list[Message]:
    """The chat as the template renders it: tool messages under the role the template supports."""
    return [{"role": role_for_tool if m["role"] == "tool" else m["role"], "content": m["content"]} for m in messages]

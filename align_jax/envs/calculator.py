"""A tool environment: arithmetic word problems with a calculator the model calls in its reply.

Tool syntax: `<calc>EXPR</calc>` anywhere in an assistant turn, e.g. "12 boxes of 7: <calc>12*7</calc>".
EXPR is numbers (`12`, `3.5`), `+ - * /`, unary minus and parentheses, evaluated exactly (fractions) by
the small parser below: no `eval`, no names, no powers (so a short expression cannot make a huge number).
Every call of a turn is answered in one tool message, a line per call: `12*7 = 84`, or `12/0: error:
division by zero`. A turn with no call is the final answer; the episode also ends after `max_turns`
assistant turns (still calling the tool then: no answer, reward 0).

Reward (summed over the episode's steps):
  +1                     the final answer is right: its last number equals the row's `answer` (as exact
                         numbers, so "84.0" and "84" match); a non-numeric answer must equal the reply
                         (stripped, case-insensitive)
  +tool_bonus            (default 0) once, when the answer is right and the episode made a well-formed
                         call: a nudge towards using the tool, paid only for right answers so that calling
                         it for its own sake earns nothing
  -malformed_penalty     (default 0.1) per malformed call (EXPR the parser rejects, or a `<calc>` never
                         closed): the result still comes back as an error, so the model can retry

Demo data: `DEMO_PROBLEMS` (align_jax/envs/data/calculator.jsonl), 50 word problems written for this
module, rows {"prompt", "answer", "expression"} (the expression that gives the answer, checked by a test).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from align_jax.data.formats import BadRowError
from align_jax.data.prompts import prompt_messages
from align_jax.envs.base import Environment, Message, StepResult

DEMO_PROBLEMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calculator.jsonl")
SYSTEM_PROMPT = (
    "You can use a calculator: write <calc>EXPR</calc> with EXPR made of numbers, + - * / and parentheses, "
    "and the result comes back to you. When you know the answer, reply with it and no <calc>."
)
MAX_EXPR_CHARS = 200
MAX_DEPTH = 32  # nested parentheses / unary signs: bounds the parser's recursion
MAX_CALLS = 8  # calls answered per turn: a runaway reply cannot make the environment do unbounded work
CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\S))")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")


class CalcError(ValueError):
    """An expression the calculator does not accept (its message is shown to the model)."""


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:  # only trailing whitespace is left
            break
        number, char = m.groups()
        if char is not None and char not in "+-*/()":
            what = "names and functions are not supported" if char.isalpha() or char == "_" else "unexpected"
            raise CalcError(f"{what}: {char!r} at {m.start(2)}")
        out.append(number if number is not None else char)
        pos = m.end()
    return out


class _Parser:
    """Recursive descent over: expr = term (+|- term)*; term = factor (*|/ factor)*;
    factor = (+|-) factor | number | ( expr )."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise CalcError("unexpected end of expression")
        self.i += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = value + self.term(depth) if self.take() == "+" else value - self.term(depth)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor(depth)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise CalcError("division by zero")
            else:
                value /= rhs
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise CalcError(f"nested deeper than {MAX_DEPTH}")
        tok = self.take()
        if tok in ("+", "-"):
            value = self.factor(depth + 1)
            return value if tok == "+" else -value
        if tok == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise CalcError("expected ')'")
            return value
        if tok[0].isdigit() or tok[0] == ".":
            return Fraction(tok)
        raise CalcError(f"unexpected {tok!r}")


def evaluate(expr: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError for anything else."""
    if len(expr) > MAX_EXPR_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens = _tokens(expr)
    if not tokens:
        raise CalcError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise CalcError(f"unexpected {parser.peek()!r}")
    return value


def format_number(x: Fraction, places: int = 6) -> str:
    """An integer as itself, anything else as a decimal rounded to `places` (trailing zeros dropped)."""
    x = round(Fraction(x), places)
    if x.denominator == 1:
        return str(x.numerator)
    sign, x = ("-" if x < 0 else ""), abs(x)
    whole, frac = divmod(x.numerator * 10**places // x.denominator, 10**places)
    return f"{sign}{whole}.{str(frac).rjust(places, '0').rstrip('0')}"


def find_calls(reply: str) -> tuple[list[str], int]:
    """(the expressions of the reply's well-closed calls, the number of `<calc>` never closed)."""
    calls = CALL.findall(reply)
    return calls, CALL.sub("", reply).count("<calc>")


def as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def answer_matches(reply: str, answer: str) -> bool:
    """Whether the reply's final answer is `answer` (see the module docstring)."""
    want = as_number(answer)
    if want is None:
        return reply.strip().lower() == answer.strip().lower()
    numbers = _NUMBER.findall(reply)
    return bool(numbers) and as_number(numbers[-1]) == want


def run_calls(calls: Sequence[str], unclosed: int) -> tuple[list[str], int]:
    """(the tool message's lines, how many calls were malformed)."""
    lines, bad = [], unclosed
    for expr in calls[:MAX_CALLS]:
        try:
            lines.append(f"{expr.strip()} = {format_number(evaluate(expr))}")
        except CalcError as e:
            lines.append(f"{expr.strip()}: error: {e}")
            bad += 1
    if len(calls) > MAX_CALLS:
        lines.append(f"error: only the first {MAX_CALLS} calls of a turn are answered")
    lines += ["error: <calc> without </calc>"] * unclosed
    return lines, bad


class CalculatorEnv(Environment):
    """Arithmetic word problems with a calculator tool; see the module docstring."""

    def __init__(
        self,
        max_turns: int = 4,
        system_prompt: str = SYSTEM_PROMPT,
        tool_bonus: float = 0.0,
        malformed_penalty: float = 0.1,
        answer_field: str = "answer",
    ):
        if max_turns < 1:
            raise ValueError(f"CalculatorEnv: max_turns must be >= 1, got {max_turns}")
        self.max_turns, self.system_prompt = max_turns, system_prompt
        self.tool_bonus, self.malformed_penalty, self.answer_field = tool_bonus, malformed_penalty, answer_field
        self.answer, self.good_calls = "", 0

    def reset(self, row: Mapping[str, Any]) -> list[Message]:
        if self.answer_field not in row:
            raise BadRowError(None, self.answer_field, "the calculator environment needs each row's answer")
        self.answer, self.good_calls = str(row[self.answer_field]), 0
        messages = prompt_messages(row, None)
        if not self.system_prompt:
            return messages
        if messages[0]["role"] == "system":  # one system message: templates differ on several
            messages[0] = {"role": "system", "content": f"{self.system_prompt}\n{messages[0]['content']}"}
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def step(self, messages: Sequence[Message]) -> StepResult:
        reply = messages[-1]["content"]
        calls, unclosed = find_calls(reply)
        if not calls and not unclosed:
            right = answer_matches(reply, self.answer)
            return StepResult([], float(right) + (self.tool_bonus if right and self.good_calls else 0.0), True)
        lines, bad = run_calls(calls, unclosed)
        self.good_calls += min(len(calls), MAX_CALLS) - (bad - unclosed)
        turns = sum(m["role"] == "assistant" for m in messages)
        done = turns >= self.max_turns
        tool = [] if done else [{"role": "tool", "content": "\n".join(lines)}]
        return StepResult(tool, -self.malformed_penalty * bad, done)

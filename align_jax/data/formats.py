"""Raw dataset rows -> canonical SFT records.

A canonical record is `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`
with at most one system message (first), at least one assistant turn, and no empty assistant turn.
Four row layouts are read, detected from the row's keys or forced:

  messages           {"messages": [{"role", "content"}, ...]}                      (OpenAI / HF chat)
  sharegpt           {"conversations": [{"from", "value"}, ...], "system"?: str}
  alpaca             {"instruction", "input"?, "output", "system"?}
  prompt_completion  {"prompt", "completion"}; each a string or a list of chat messages (TRL style)

Every problem is a `BadRowError` that names the file, the row and the field, so a long run that meets
one bad row says exactly which (and `on_bad_row="skip"` can count it and move on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from align_jax.errors import UserError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> our roles. Anything else (tool calls, observations) is not SFT chat data we
# know how to mask, so it is a bad row rather than a silent guess.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Message = dict[str, str]
Record = dict[str, list[Message]]


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a row came from. `unit` is "line" for JSONL (1-based, what an editor shows) and "row"
    (0-based index) for JSON arrays, Parquet and datasets."""

    file: str
    row: int
    unit: str = "row"

    def __str__(self) -> str:
        return f"{self.file} {self.unit} {self.row}"


class BadRowError(UserError, ValueError):
    """A row that cannot become a canonical record. Carries `origin`, `field` and `problem`."""

    def __init__(self, origin: Origin | None, field: str | None, problem: str):
        self.origin = origin
        self.field = field
        self.problem = problem
        where = str(origin) if origin is not None else "row"
        what = f", field {field!r}" if field is not None else ""
        super().__init__(f"{where}{what}: {problem}")

    @property
    def file(self) -> str | None:
        return self.origin.file if self.origin else None

    @property
    def row(self) -> int | None:
        return self.origin.row if self.origin else None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Reader:
    """Field access for one row that turns every problem into a BadRowError with its field path."""

    def __init__(self, origin: Origin | None):
        self.origin = origin

    def fail(self, field: str | None, problem: str) -> BadRowError:
        return BadRowError(self.origin, field, problem)

    def get(self, obj: Mapping[str, Any], key: str, field: str, required: bool = True) -> Any:
        value = obj.get(key)
        if value is None and required:
            raise self.fail(field, "missing")
        return value

    def text(self, value: Any, field: str) -> str:
        # Bytes arrive from Parquet binary columns and TFDS; a str with lone surrogates is what invalid
        # UTF-8 becomes after a surrogateescape decode, or what a JSON "\ud800" escape decodes to.
        # Either would crash the tokenizer (or worse, be silently replaced), so it is this row's error.
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self.fail(field, f"undecodable text: invalid UTF-8 at byte {e.start}") from None
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {_type_name(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.fail(
                field, f"undecodable text: lone surrogate {value[e.start]!r} at character {e.start}"
            ) from None
        return value

    def items(self, value: Any, field: str) -> list[Mapping[str, Any]]:
        if not isinstance(value, list | tuple):
            raise self.fail(field, f"expected a list, got {_type_name(value)}")
        if not value:
            raise self.fail(field, "empty list")
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise self.fail(f"{field}[{i}]", f"expected an object, got {_type_name(item)}")
        return list(value)

    def chat(self, value: Any, field: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> list[Message]:
        out = []
        for i, item in enumerate(self.items(value, field)):
            role_field, content_field = f"{field}[{i}].{role_key}", f"{field}[{i}].{content_key}"
            raw_role = self.text(self.get(item, role_key, role_field), role_field)
            if raw_role not in roles:
                raise self.fail(role_field, f"unknown role {raw_role!r}; expected one of {sorted(roles)}")
            content = self.text(self.get(item, content_key, content_field), content_field)
            out.append({"role": roles[raw_role], "content": content, "_field": f"{field}[{i}]"})
        return out


def _finish(r: _Reader, messages: list[Message], field: str) -> Record:
    """Checks the invariants every canonical record keeps, then drops the bookkeeping."""
    for i, m in enumerate(messages):
        where = m.get("_field", f"{field}[{i}]")
        if m["role"] == "system" and i != 0:
            raise r.fail(where, "a system message may only come first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise r.fail(where, "empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise r.fail(field, "no assistant turn: nothing to learn from")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _system(r: _Reader, row: Mapping[str, Any]) -> list[Message]:
    value = row.get("system")
    if value is None:
        return []
    text = r.text(value, "system")
    return [{"role": "system", "content": text, "_field": "system"}] if text.strip() else []


def _from_messages(r: _Reader, row: Mapping[str, Any]) -> Record:
    roles = {x: x for x in ROLES}
    return _finish(r, r.chat(r.get(row, "messages", "messages"), "messages", "role", "content", roles), "messages")


def _from_sharegpt(r: _Reader, row: Mapping[str, Any]) -> Record:
    turns = r.chat(r.get(row, "conversations", "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _finish(r, _system(r, row) + turns, "conversations")


def _from_alpaca(r: _Reader, row: Mapping[str, Any]) -> Record:
    instruction = r.text(r.get(row, "instruction", "instruction"), "instruction")
    extra = r.get(row, "input", "input", required=False)
    extra = r.text(extra, "input") if extra is not None else ""
    # Alpaca's own prompt puts the input after the instruction as a separate paragraph.
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = r.text(r.get(row, "output", "output"), "output")
    messages = [
        *_system(r, row),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output, "_field": "output"},
    ]
    return _finish(r, messages, "output")


def _from_prompt_completion(r: _Reader, row: Mapping[str, Any]) -> Record:
    roles = {x: x for x in ROLES}
    prompt = r.get(row, "prompt", "prompt")
    if isinstance(prompt, list | tuple):
        head = r.chat(prompt, "prompt", "role", "content", roles)
    else:
        head = [{"role": "user", "content": r.text(prompt, "prompt"), "_field": "prompt"}]
    completion = r.get(row, "completion", "completion")
    if isinstance(completion, list | tuple):
        tail = r.chat(completion, "completion", "role", "content", {"assistant": "assistant"})
    else:
        tail = [{"role": "assistant", "content": r.text(completion, "completion"), "_field": "completion"}]
    return _finish(r, head + tail, "completion")


_READERS: dict[str, Callable[[_Reader, Mapping[str, Any]], Record]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def detect_format(row: Mapping[str, Any], origin: Origin | None = None) -> str:
    """The format a row's keys announce; a BadRowError when they announce none."""
    if not isinstance(row, Mapping):
        raise BadRowError(origin, None, f"expected an object, got {_type_name(row)}")
    # Null columns do not count: Parquet files and datasets that mix formats hold every column in every row.
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise BadRowError(
        origin,
        None,
        f"cannot tell the format from keys {sorted(keys)}; expected 'messages', 'conversations', "
        "'instruction'+'output' or 'prompt'+'completion' (or set format=...)",
    )


def to_record(row: Any, format: str = "auto", origin: Origin | None = None) -> Record:
    """Normalises one raw row to a canonical record, or raises BadRowError naming origin and field."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")
    if not isinstance(row, Mapping):
        raise BadRowError(origin, None, f"expected an object, got {_type_name(row)}")
    fmt = detect_format(row, origin) if format == "auto" else format
    return _READERS[fmt](_Reader(origin), row)

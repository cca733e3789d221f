"""JSONL in and out for PAS: atomic writes, reads whose errors name the file, line and field, and prompt
extraction from the row shapes the other stages use."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from align_jax.data.sources import iter_jsonl


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Writes one JSON object per line to a temporary file beside `path`, then renames it over `path`:
    a reader never sees a half-written file. Returns the number of rows."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); a bad line raises ValueError naming file and line."""
    return [row for _, row in iter_jsonl(path)]


def _user_turns(messages: Any, where: str, field: str) -> list[str]:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError(f"{where}, field {field!r}: expected a list of {{role, content}} messages")
    users = []
    for k, m in enumerate(messages):
        if m.get("role") == "user":
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{where}, field {field!r}: message {k} has no string 'content'")
            users.append(m["content"])
    if not users:
        raise ValueError(f"{where}, field {field!r}: no user turn")
    return users


def prompt_of(row: Mapping[str, Any], where: str, *, field: str = "prompt", turn: str = "first") -> str:
    """The prompt text of a row: `row[field]` as a string, or a user turn ("first" or "last") of
    `row[field]` / `row["messages"]` as a message list."""
    if turn not in ("first", "last"):
        raise ValueError(f"turn={turn!r}; expected 'first' or 'last'")
    if field in row:
        value = row[field]
        if isinstance(value, str):
            return value
        turns = _user_turns(value, where, field)
    elif "messages" in row:
        turns = _user_turns(row["messages"], where, "messages")
    else:
        raise ValueError(f"{where}: no {field!r} field (and no 'messages')")
    return turns[0] if turn == "first" else turns[-1]


def read_prompts(path: str, *, field: str = "prompt", turn: str = "first") -> list[str]:
    """Prompt texts of a JSONL file of {"prompt": str | messages} or {"messages": [...]} rows (e.g. the
    SFT demo chats: the first user turn of each)."""
    return [prompt_of(row, where, field=field, turn=turn) for where, row in iter_jsonl(path)]

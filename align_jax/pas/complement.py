"""Complementary prompts: a teacher writes them few-shot per category, a judge checks them, invalid ones
are regenerated; then the valid ones become SFT rows for the PAS model.

    rows = generate_complements(curated.rows, teacher, RuleJudge(), max_attempts=3, few_shot=3, seed=0)
    write_jsonl("complements.jsonl", rows)
    write_jsonl("pas_sft.jsonl", sft_rows(rows))       # -> the sft stage's data.train

Each output row is exactly {"prompt", "complement", "category", "verdict", "reason", "attempts"}:
verdict "valid" or "invalid", reason "" when valid, attempts the number of teacher calls the row took
(1..max_attempts). A row still invalid after max_attempts keeps its last complement and verdict
"invalid"; sft_rows leaves it out.

Attempt a (1-based) samples the teacher at temperature + (a - 1) * temperature_step with a seed drawn
from (seed, a, batch index), so a retry is a different draw, not the same greedy answer again. Rows are
sent to the teacher and the judge in batches of `batch`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from align_jax.pas import templates

log = logging.getLogger(__name__)

COMPLEMENT_KEYS = ("prompt", "complement", "category", "verdict", "reason", "attempts")
_LABEL = re.compile(r"^\s*(?:complement(?:ary prompt)?|guidance)\s*:\s*", re.IGNORECASE)


def clean_complement(text: str) -> str:
    """A teacher's reply as a complement: trimmed, without a leading "Complement:" label or wrapping quotes."""
    text = _LABEL.sub("", text.strip()).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def attempt_seed(seed: int, attempt: int, batch_index: int) -> int:
    return int(np.random.SeedSequence([seed, attempt, batch_index]).generate_state(1)[0] % (2**31 - 1))


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"complement input row {i}: expected a mapping, got {type(row).__name__}")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"complement input row {i}, field 'prompt': expected a non-empty string")
        if "category" in row and not isinstance(row["category"], str):
            raise ValueError(f"complement input row {i}, field 'category': expected a string")


def generate_complements(
    rows: Sequence[Mapping[str, Any]],
    teacher: Any,
    judge: Any,
    *,
    max_attempts: int = 3,
    few_shot: int = 3,
    examples: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    seed: int = 0,
    batch: int = 64,
    temperature: float = 0.7,
    temperature_step: float = 0.2,
    max_new_tokens: int = 64,
) -> list[dict[str, Any]]:
    """One complement row per input row (same order). Input rows need "prompt"; "category" defaults to
    "other"; an "answer" (the prompt's short reference answer) is passed to the judge when present.
    `teacher.generate(chats, max_new_tokens=, temperature=, seed=) -> list[str]` (a ChatModel, or
    teacher.TemplateTeacher in the offline demo); `judge.judge(items) -> list[Verdict]` (judge.py)."""
    if max_attempts < 1 or batch < 1:
        raise ValueError(f"max_attempts ({max_attempts}) and batch ({batch}) must be at least 1")
    _check_rows(rows)
    examples = templates.FEW_SHOT if examples is None else examples
    out = [
        {
            "prompt": r["prompt"],
            "complement": "",
            "category": r.get("category") or templates.OTHER,
            "verdict": "invalid",
            "reason": "",
            "attempts": 0,
        }
        for r in rows
    ]
    pending = list(range(len(rows)))
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
        temp = temperature + (attempt - 1) * temperature_step
        for b, lo in enumerate(range(0, len(pending), batch)):
            idx = pending[lo : lo + batch]
            chats = [templates.teacher_messages(out[i]["prompt"], out[i]["category"], examples, few_shot) for i in idx]
            replies = teacher.generate(
                chats, max_new_tokens=max_new_tokens, temperature=temp, seed=attempt_seed(seed, attempt, b)
            )
            if len(replies) != len(idx):
                raise ValueError(f"teacher returned {len(replies)} replies for {len(idx)} prompts")
            items = []
            for i, reply in zip(idx, replies, strict=True):
                out[i]["complement"], out[i]["attempts"] = clean_complement(reply), attempt
                item = {"prompt": out[i]["prompt"], "complement": out[i]["complement"], "category": out[i]["category"]}
                if rows[i].get("answer") is not None:
                    item["answer"] = rows[i]["answer"]
                items.append(item)
            verdicts = judge.judge(items)
            if len(verdicts) != len(idx):
                raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(idx)} complements")
            for i, v in zip(idx, verdicts, strict=True):
                out[i]["verdict"], out[i]["reason"] = ("valid", "") if v.valid else ("invalid", v.reason)
        pending = [i for i in pending if out[i]["verdict"] != "valid"]
        log.info("complements: attempt %d, %d of %d still invalid", attempt, len(pending), len(rows))
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts for a log line: valid / invalid rows, rows per attempt count, invalid reasons."""
    reasons: dict[str, int] = {}
    attempts: dict[int, int] = {}
    for r in rows:
        attempts[r["attempts"]] = attempts.get(r["attempts"], 0) + 1
        if r["verdict"] != "valid":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    valid = sum(r["verdict"] == "valid" for r in rows)
    return {"rows": len(rows), "valid": valid, "invalid": len(rows) - valid, "attempts": attempts, "reasons": reasons}


def check_complement_row(row: Any, where: str) -> None:
    """Raises ValueError naming `where` and the field when a row breaks the complement JSONL contract."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object")
    if set(row) != set(COMPLEMENT_KEYS):
        raise ValueError(f"{where}: keys {sorted(row)}; expected exactly {sorted(COMPLEMENT_KEYS)}")
    for key in ("prompt", "complement", "category", "reason"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}, field {key!r}: expected a string")
    if row["verdict"] not in ("valid", "invalid"):
        raise ValueError(f"{where}, field 'verdict': {row['verdict']!r} is not 'valid' or 'invalid'")
    if not isinstance(row["attempts"], int) or isinstance(row["attempts"], bool) or row["attempts"] < 1:
        raise ValueError(f"{where}, field 'attempts': expected a positive integer")


def sft_rows(complement_rows: Sequence[Mapping[str, Any]], *, system: str = templates.PAS_SYSTEM) -> list[dict]:
    """SFT chats for the PAS model, one per valid row with a non-empty complement, in OpenAI messages
    form: system = the PAS instruction, user = the prompt, assistant = the complement."""
    out = []
    for i, row in enumerate(complement_rows):
        check_complement_row(row, f"complement row {i}")
        if row["verdict"] == "valid" and row["complement"].strip():
            out.append(
                {
                    "messages": [
                        *templates.pas_messages(row["prompt"], system),
                        {"role": "assistant", "content": row["complement"]},
                    ]
                }
            )
    return out

"""Preference rows -> canonical paired or unpaired records (the rm and dpo stages' row formats).

Row layouts (`format`; "auto" tells them apart per row by their keys):
  hh_rlhf     {"chosen": str, "rejected": str}: Anthropic HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant:
              ..."). Each is split into turns (Human -> user, Assistant -> assistant, text stripped at both ends,
              newlines inside a turn kept); all but the last turn is the prompt, and must be the same in both.
  preference  {"prompt"?: str | [msgs], "chosen": str | [msgs], "rejected": str | [msgs]}: plain strings, TRL's
              conversational form, UltraFeedback. chosen/rejected may repeat the prompt messages first; without
              a prompt they are whole conversations (TRL's implicit prompt) whose shared part is the prompt.
  kto         {"prompt": str | [msgs], "completion": str | [msgs], "label": bool}: TRL's unpaired form.
Paired rows may carry absolute scores `chosen_score` and `rejected_score` (UltraFeedback's `score_chosen` and
`score_rejected` are read too): both or neither, finite numbers. Canonical records (`to_preference_record`):
  paired    {"prompt": [msgs ending with a user turn], "chosen": [assistant msg], "rejected": [assistant msg],
             "chosen_score": float | None, "rejected_score": float | None}
  unpaired  {"prompt": [...], "completion": [assistant msg], "label": bool}
Every problem (a missing field, identical responses, prompts that differ, no or an empty final assistant turn,
half or non-finite scores, ...) is a BadRowError naming file, row and field, under the on_bad_row policy.

Public datasets, rows as `datasets` gives them (a Parquet export, a save_to_disk directory, JSONL, or the hub name
with its split; tests/data/test_preference_schemas.py holds fixtures in their exact schemas):
  Anthropic/hh-rlhf (hh_rlhf). Its quirks: leading blank lines or spaces that differ between the two transcripts
    and around turns are ignored (turns are stripped). Some rows have two transcripts that part before the last
    reply (a different number of turns, or an earlier turn that differs): their preference is about more than
    one reply, so no prompt/response split of them is right. Rows with an empty or identical final reply compare
    nothing. All three are BadRowErrors naming file, row and field: under the default data.on_bad_row="error"
    the first stops the run, "skip" counts and passes over them. (TRL instead keeps the common text up to the
    last shared "Assistant:" as the prompt and the rest, later Human turns included, as one response.)
  HuggingFaceH4/ultrafeedback_binarized (preference; splits train_prefs / test_prefs). chosen and rejected repeat
    the user turn; the `messages` column beside them is ignored (it is the chosen conversation again, for SFT);
    score_chosen / score_rejected become the absolute scores (the rm stage's score_weight term). Ties
    (score_chosen == score_rejected, which the binarisation leaves in) are kept, as TRL keeps them: their
    Bradley-Terry / DPO term is noise around an arbitrary order, but the score term still learns that both are
    worth the same, and dropping them would silently make the train set differ from everyone else's. To drop
    them, filter first: `ds.filter(lambda r: r["score_chosen"] != r["score_rejected"])`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from align_jax.data.formats import ROLES, BadRowError, Message, Origin, _Reader, _type_name

PREF_FORMATS = ("auto", "hh_rlhf", "preference", "kto")
SCORE_KEYS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"))
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ALL_ROLES = {r: r for r in ROLES}
Record = dict[str, Any]


def _key(msgs: Sequence[Message]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in msgs]


def _clean(msgs: Sequence[Message]) -> list[Message]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _check_prompt(r: _Reader, msgs: list[Message], field: str) -> None:
    if not msgs:
        raise r.fail(field, "no user turn before the response")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i:
            raise r.fail(m["_field"], "a system message may only come first")
    if msgs[-1]["role"] != "user":
        raise r.fail(msgs[-1]["_field"], f"the prompt must end with a user turn, not a {msgs[-1]['role']} turn")


def _prompt(r: _Reader, value: Any) -> list[Message]:
    if isinstance(value, list | tuple):
        msgs = r.chat(value, "prompt", "role", "content", _ALL_ROLES)
    else:
        msgs = [{"role": "user", "content": r.text(value, "prompt"), "_field": "prompt"}]
    _check_prompt(r, msgs, "prompt")
    return msgs


def _response(r: _Reader, value: Any, field: str, prompt: list[Message]) -> list[Message]:
    """One assistant message: a string, or a message list that may repeat the prompt first."""
    if isinstance(value, list | tuple):
        msgs = r.chat(value, field, "role", "content", _ALL_ROLES)
        if len(msgs) > len(prompt) and _key(msgs[: len(prompt)]) == _key(prompt):
            msgs = msgs[len(prompt) :]
    else:
        msgs = [{"role": "assistant", "content": r.text(value, field), "_field": field}]
    if [m["role"] for m in msgs] != ["assistant"]:
        roles = [m["role"] for m in msgs]
        raise r.fail(field, f"expected one assistant message after the prompt, got roles {roles}")
    if not msgs[0]["content"].strip():
        raise r.fail(msgs[0]["_field"], "empty assistant turn")
    return msgs


def _hh_turns(r: _Reader, value: Any, field: str) -> list[Message]:
    parts = _HH_TURN.split(r.text(value, field).lstrip())
    if parts[0].strip() or len(parts) < 3:
        found = "text before the first turn" if parts[0].strip() else "no turn"
        raise r.fail(field, f"not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'): {found}")
    return [
        {"role": _HH_ROLES[w], "content": t.strip(), "_field": field}
        for w, t in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _shared_prompt(r: _Reader, chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], ...]:
    """Two whole dialogues -> (prompt, chosen response, rejected response)."""
    for msgs, field in ((chosen, "chosen"), (rejected, "rejected")):
        if not any(m["role"] == "assistant" for m in msgs):
            raise r.fail(field, "no assistant turn: nothing to compare")
        if msgs[-1]["role"] != "assistant":
            raise r.fail(field, f"ends with a {msgs[-1]['role']} turn; the last turn must be the assistant's response")
        if not msgs[-1]["content"].strip():
            raise r.fail(field, f"empty final assistant turn (turn {len(msgs)})")
    a, b = _key(chosen[:-1]), _key(rejected[:-1])
    if a != b:
        turn = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))) + 1
        counts = f" (chosen has {len(chosen)} turns, rejected {len(rejected)})" if len(a) != len(b) else ""
        raise r.fail(
            "rejected",
            f"differs from 'chosen' at turn {turn}{counts}, before the last assistant turn: a pair must share its "
            "prompt",
        )
    _check_prompt(r, chosen[:-1], "chosen")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _score(r: _Reader, value: Any, field: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise r.fail(field, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise r.fail(field, f"not a finite number: {value!r}")
    return float(value)


def _paired(r: _Reader, row: Mapping[str, Any], prompt: list, chosen: list, rejected: list) -> Record:
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise r.fail("rejected", "identical to 'chosen': a pair needs two different responses")
    scores: tuple[float | None, float | None] = (None, None)
    for keys in SCORE_KEYS:
        values = [row.get(k) for k in keys]
        if values == [None, None]:
            continue
        for value, key, other in ((values[0], *keys), (values[1], *keys[::-1])):
            if value is None:
                raise r.fail(key, f"missing while {other!r} is given: scores come in pairs")
        scores = (_score(r, values[0], keys[0]), _score(r, values[1], keys[1]))
        break
    out = {"prompt": _clean(prompt), "chosen": _clean(chosen), "rejected": _clean(rejected)}
    return {**out, "chosen_score": scores[0], "rejected_score": scores[1]}


def _from_hh(r: _Reader, row: Mapping[str, Any]) -> Record:
    chosen = _hh_turns(r, r.get(row, "chosen", "chosen"), "chosen")
    rejected = _hh_turns(r, r.get(row, "rejected", "rejected"), "rejected")
    return _paired(r, row, *_shared_prompt(r, chosen, rejected))


def _from_preference(r: _Reader, row: Mapping[str, Any]) -> Record:
    chosen, rejected = r.get(row, "chosen", "chosen"), r.get(row, "rejected", "rejected")
    if row.get("prompt") is None:
        if not isinstance(chosen, list | tuple):
            raise r.fail("prompt", "missing (and 'chosen' is not a conversation to take it from)")
        whole = [r.chat(v, f, "role", "content", _ALL_ROLES) for v, f in ((chosen, "chosen"), (rejected, "rejected"))]
        return _paired(r, row, *_shared_prompt(r, *whole))
    prompt = _prompt(r, row["prompt"])
    return _paired(r, row, prompt, _response(r, chosen, "chosen", prompt), _response(r, rejected, "rejected", prompt))


def _from_kto(r: _Reader, row: Mapping[str, Any]) -> Record:
    prompt = _prompt(r, r.get(row, "prompt", "prompt"))
    completion = _response(r, r.get(row, "completion", "completion"), "completion", prompt)
    label = r.get(row, "label", "label")
    if not isinstance(label, bool | np.bool_):
        raise r.fail("label", f"expected true or false, got {_type_name(label)}")
    return {"prompt": _clean(prompt), "completion": _clean(completion), "label": bool(label)}


_READERS = {"hh_rlhf": _from_hh, "preference": _from_preference, "kto": _from_kto}


def detect_preference_format(row: Any, origin: Origin | None = None) -> str:
    """The preference format a row's keys announce; a BadRowError when they announce none."""
    if not isinstance(row, Mapping):
        raise BadRowError(origin, None, f"expected an object, got {_type_name(row)}")
    keys = {k for k, v in row.items() if v is not None}
    if keys & {"chosen", "rejected"}:
        first = row.get("chosen") if row.get("chosen") is not None else row.get("rejected")
        return "hh_rlhf" if "prompt" not in keys and isinstance(first, str | bytes) else "preference"
    if keys & {"completion", "label"}:
        return "kto"
    raise BadRowError(
        origin,
        None,
        f"cannot tell the format from keys {sorted(keys)}; expected 'chosen'+'rejected' (with or without "
        "'prompt') or 'prompt'+'completion'+'label' (or set format=...)",
    )


def to_preference_record(row: Any, format: str = "auto", origin: Origin | None = None) -> Record:
    """One raw row -> a canonical paired or unpaired record (module doc), or a BadRowError naming origin and field."""
    if format not in PREF_FORMATS:
        raise ValueError(f"format={format!r}; expected one of {PREF_FORMATS}")
    fmt = detect_preference_format(row, origin) if format == "auto" else format
    if not isinstance(row, Mapping):
        raise BadRowError(origin, None, f"expected an object, got {_type_name(row)}")
    return _READERS[fmt](_Reader(origin), row)

"""Verifiable instruction following: prompts that carry checkable instructions, and the checks.

A prompt set is JSONL, one row per prompt:

    {"prompt": "Describe a forest in exactly 3 bullet points.",            # or a messages list
     "checks": [{"name": "bullet_list", "n": 3}, {"name": "language", "lang": "en"}],
     "category": "lists",                                                   # optional
     "reference": "- tall trees\\n- moss\\n- birdsong"}                    # optional: a right answer

Every check is a pure function `name -> fn(response, **kwargs) -> bool` in `CHECKS`; a row names the
check and gives its keyword arguments. The scores follow the usual instruction-following read-out:
prompt-level strict accuracy (every check of a row passes), instruction-level accuracy (the share of
all checks that pass), and the accuracy of each check name.

    rows = load_prompt_set("demo")                         # or "general", or a path
    score_responses(rows, responses)                        # -> {"prompt_acc": ..., "instruction_acc": ...}
    evaluate_constraints(ChatModel.load("runs/sft-demo"), "demo")   # generates, then scores

Text units, as the checks count them:
  word      a run of letters or digits, with inner apostrophes or hyphens ("don't", "well-known");
            "3 plus 4 is 7." has five words, "1. fox" two.
  sentence  a piece of text between terminal punctuation (. ! ?) followed by a space, and line breaks,
            that holds at least one letter ("1." alone, a list number, is no sentence).
  list item a line starting with "N." or "N)" (numbered) or with "-", "*" or "•" (bullets), then text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from align_jax.data.sources import iter_jsonl

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# Short names for the bundled prompt sets.
PROMPT_SETS = {
    "demo": os.path.join(DATA_DIR, "constraints_demo.jsonl"),
    "general": os.path.join(DATA_DIR, "constraints_general.jsonl"),
}
ROLES = ("system", "user", "assistant")
ROW_KEYS = ("prompt", "checks", "category", "reference")
# `language`: the share of a response's letters that must be in the asked-for script.
LANGUAGE_SHARE = 0.9

Prompt = str | Sequence[Mapping[str, str]]


# Text units ------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S")
_BULLET = re.compile(r"^\s*[-*•]\s+\S")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    pieces = (p.strip() for p in _SENTENCE_END.split(text))
    return [p for p in pieces if any(ch.isalpha() for ch in p)]


# Scripts by Unicode block, for `language`. A letter outside every listed range counts as "other".
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "hebrew": ((0x590, 0x5FF),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x900, 0x97F),),
    "thai": ((0xE00, 0xE7F),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    # Han ideographs (with extension A and the compatibility block) plus Japanese kana.
    "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x31F0, 0x31FF)),
}
# Language codes accepted besides the script names; "en" is also held to mostly-ASCII letters.
LANGUAGES = {
    **dict.fromkeys(("en", "fr", "de", "es", "it", "pt", "nl"), "latin"),
    **dict.fromkeys(("ru", "uk"), "cyrillic"),
    **dict.fromkeys(("ar", "fa"), "arabic"),
    **dict.fromkeys(("zh", "ja"), "cjk"),
    **{"el": "greek", "he": "hebrew", "hi": "devanagari", "th": "thai", "ko": "hangul"},
}


def script_of(ch: str) -> str:
    code = ord(ch)
    for name, ranges in SCRIPTS.items():
        if any(lo <= code <= hi for lo, hi in ranges):
            return name
    return "other"


# The registry -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """A check and its keyword arguments: name -> kind, where kind is "int" (>= 0), "pos_int" (>= 1),
    "str" (non-empty), "str_list" (a non-empty list of non-empty strings) or "lang" (a key of LANGUAGES or
    SCRIPTS)."""

    name: str
    fn: Callable[..., bool]
    params: Mapping[str, str]
    doc: str


CHECKS: dict[str, Check] = {}


def check(name: str, **params: str) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        CHECKS[name] = Check(name, fn, params, (fn.__doc__ or "").strip())
        return fn

    return register


@check("max_words", n="int")
def max_words(response: str, n: int) -> bool:
    """At most n words."""
    return len(words(response)) <= n


@check("min_words", n="int")
def min_words(response: str, n: int) -> bool:
    """At least n words."""
    return len(words(response)) >= n


@check("max_sentences", n="pos_int")
def max_sentences(response: str, n: int) -> bool:
    """At most n sentences."""
    return len(sentences(response)) <= n


@check("all_capitals")
def all_capitals(response: str) -> bool:
    """No lower-case letter, and at least one upper-case one (a bare number is not "in capitals")."""
    return not any(ch.islower() for ch in response) and any(ch.isupper() for ch in response)


@check("all_lowercase")
def all_lowercase(response: str) -> bool:
    """No upper-case letter, and at least one lower-case one."""
    return not any(ch.isupper() for ch in response) and any(ch.islower() for ch in response)


def _phrase(keyword: str) -> re.Pattern[str]:
    # Whole words only ("cat" is not in "category"); a phrase matches across any run of spaces.
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


@check("include_keywords", keywords="str_list")
def include_keywords(response: str, keywords: Sequence[str]) -> bool:
    """Every keyword occurs as a whole word or phrase, ignoring case."""
    return all(_phrase(k).search(response) for k in keywords)


@check("exclude_keywords", keywords="str_list")
def exclude_keywords(response: str, keywords: Sequence[str]) -> bool:
    """No keyword occurs as a whole word or phrase, ignoring case."""
    return not any(_phrase(k).search(response) for k in keywords)


@check("numbered_list", n="pos_int")
def numbered_list(response: str, n: int) -> bool:
    """Exactly n numbered items, numbered 1..n in order (other lines, say an intro, are allowed)."""
    numbers = [int(m.group(1)) for line in response.splitlines() if (m := _NUMBERED.match(line))]
    return numbers == list(range(1, n + 1))


@check("bullet_list", n="pos_int")
def bullet_list(response: str, n: int) -> bool:
    """Exactly n bullet items ("-", "*" or "•" at a line's start)."""
    return sum(bool(_BULLET.match(line)) for line in response.splitlines()) == n


@check("starts_with", prefix="str")
def starts_with(response: str, prefix: str) -> bool:
    """Starts with the prefix, ignoring case and leading white space."""
    return response.lstrip().lower().startswith(prefix.lower())


@check("ends_with", suffix="str")
def ends_with(response: str, suffix: str) -> bool:
    """Ends with the suffix, ignoring case and trailing white space."""
    return response.rstrip().lower().endswith(suffix.lower())


@check("no_commas")
def no_commas(response: str) -> bool:
    """No comma (ASCII, full-width or the ideographic one)."""
    return not any(ch in response for ch in ",，、")


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n\s*```$", re.DOTALL)


@check("json_format")
def json_format(response: str) -> bool:
    """The whole response parses as JSON; one enclosing ``` fence (```json ...```) is allowed."""
    text = response.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


@check("language", lang="lang")
def language(response: str, lang: str) -> bool:
    """The letters are in the script of `lang` (a code in LANGUAGES or a script name in SCRIPTS).

    Heuristic: at least one letter, and at least LANGUAGE_SHARE (90%) of the letters (str.isalpha;
    digits, punctuation and emoji do not count) lie in that script's Unicode blocks. For "en", 90% of
    the letters must also be plain ASCII, so French or German text with many accents fails while an
    English text quoting "café" passes. Scripts are not languages: this tells English from Russian or
    Chinese, not English from Dutch."""
    script = LANGUAGES.get(lang, lang)
    letters = [ch for ch in unicodedata.normalize("NFC", response) if ch.isalpha()]
    if not letters:
        return False
    in_script = sum(script_of(ch) == script for ch in letters)
    if in_script < LANGUAGE_SHARE * len(letters):
        return False
    return lang != "en" or sum(ch.isascii() for ch in letters) >= LANGUAGE_SHARE * len(letters)


# Prompt sets ------------------------------------------------------------------------------------------


def _bad(where: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{where}, field {field!r}: {problem}")


def _check_param(where: str, field: str, kind: str, value: Any) -> Any:
    if kind in ("int", "pos_int"):
        low = 1 if kind == "pos_int" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _bad(where, field, f"expected an integer >= {low}, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise _bad(where, field, f"expected a non-empty string, got {value!r}")
        return value
    if kind == "lang":
        if value not in LANGUAGES and value not in SCRIPTS:
            raise _bad(
                where, field, f"unknown language or script {value!r}; known: {sorted(LANGUAGES) + sorted(SCRIPTS)}"
            )
        return value
    if kind == "str_list":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise _bad(where, field, f"expected a non-empty list of non-empty strings, got {value!r}")
        return list(value)
    raise AssertionError(f"unknown parameter kind {kind!r}")


def validate_check(spec: Any, where: str, field: str) -> dict[str, Any]:
    """A check call {"name": ..., **kwargs}, checked against the registry."""
    if not isinstance(spec, Mapping):
        raise _bad(where, field, f"expected an object with a 'name', got {spec!r}")
    name = spec.get("name")
    if name not in CHECKS:
        raise _bad(where, f"{field}.name", f"unknown check {name!r}; known checks: {sorted(CHECKS)}")
    params = CHECKS[name].params
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise _bad(where, field, f"check {name!r} takes {sorted(params) or 'no arguments'}; got unknown {unknown}")
    missing = sorted(set(params) - set(kwargs))
    if missing:
        raise _bad(where, field, f"check {name!r} needs {missing}")
    return {"name": name, **{k: _check_param(where, f"{field}.{k}", params[k], v) for k, v in kwargs.items()}}


def validate_prompt(prompt: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _bad(where, "prompt", "empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise _bad(where, "prompt", f"expected a string or a non-empty list of messages, got {type(prompt).__name__}")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _bad(where, f"prompt[{i}]", f"expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise _bad(where, f"prompt[{len(out) - 1}].role", "the last message must be the user's")
    return out


def validate_row(row: Any, where: str) -> dict[str, Any]:
    """A prompt-set row, normalised: prompt, checks (a non-empty list), category ("" if absent), and
    reference when given."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        raise _bad(where, unknown[0], f"unknown field; a row has {list(ROW_KEYS)}")
    if "prompt" not in row:
        raise _bad(where, "prompt", "missing")
    checks = row.get("checks")
    if not isinstance(checks, list) or not checks:
        raise _bad(where, "checks", f"expected a non-empty list of checks, got {checks!r}")
    out: dict[str, Any] = {
        "prompt": validate_prompt(row["prompt"], where),
        "checks": [validate_check(c, where, f"checks[{i}]") for i, c in enumerate(checks)],
        "category": row.get("category", ""),
    }
    if not isinstance(out["category"], str):
        raise _bad(where, "category", f"expected a string, got {out['category']!r}")
    if "reference" in row:
        if not isinstance(row["reference"], str):
            raise _bad(where, "reference", f"expected a string, got {row['reference']!r}")
        out["reference"] = row["reference"]
    return out


def resolve_prompt_set(path: str) -> str:
    """A bundled set's short name ("demo", "general") or a path, as a path."""
    return PROMPT_SETS.get(path, path)


def load_prompt_set(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The validated rows of a JSONL prompt set (its first `limit` rows when given). A bad row raises
    ValueError naming the file, the line and the field."""
    path = resolve_prompt_set(path)
    rows = []
    for where, raw in iter_jsonl(path):
        rows.append(validate_row(raw, where))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


# Scoring ----------------------------------------------------------------------------------------------


def run_checks(row: Mapping[str, Any], response: str) -> list[bool]:
    """Whether `response` passes each of the row's checks, in order."""
    return [bool(CHECKS[c["name"]].fn(response, **{k: v for k, v in c.items() if k != "name"})) for c in row["checks"]]


def score_responses(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """Accuracies of one response per row: prompt_acc (all of a row's checks pass), instruction_acc
    (share of all checks that pass), per_check (name -> share of that check's uses that pass),
    per_category (category -> prompt_acc, rows with a category only), and the counts."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} prompt rows but {len(responses)} responses")
    rows = [validate_row(r, f"row {i}") for i, r in enumerate(rows)]
    prompt_ok, passed, total = 0, 0, 0
    per_check: dict[str, list[int]] = {}
    per_category: dict[str, list[int]] = {}
    for row, response in zip(rows, responses, strict=True):
        results = run_checks(row, response)
        prompt_ok += all(results)
        passed, total = passed + sum(results), total + len(results)
        for c, ok in zip(row["checks"], results, strict=True):
            counts = per_check.setdefault(c["name"], [0, 0])
            counts[0], counts[1] = counts[0] + ok, counts[1] + 1
        if row["category"]:
            counts = per_category.setdefault(row["category"], [0, 0])
            counts[0], counts[1] = counts[0] + all(results), counts[1] + 1
    n = len(rows)
    return {
        "prompt_acc": prompt_ok / n if n else float("nan"),
        "instruction_acc": passed / total if total else float("nan"),
        "n_prompts": n,
        "n_instructions": total,
        "per_check": {k: ok / count for k, (ok, count) in sorted(per_check.items())},
        "per_category": {k: ok / count for k, (ok, count) in sorted(per_category.items())},
    }


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def evaluate_constraints(
    model: Any,
    path: str,
    *,
    max_new_tokens: int = 64,
    limit: int | None = None,
    augment: Callable[[list[dict[str, str]]], list[dict[str, str]]] | None = None,
    n_examples: int = 6,
) -> dict[str, Any]:
    """Generates a greedy response to every prompt of the set with `model` (a ChatModel, or anything
    with its `generate`) and scores them. `augment` rewrites each prompt's messages before generation
    (inference-time prompt augmentation); the checks read the response only, so they are unchanged.
    Adds `examples`: up to n_examples rows, failures first, each {prompt, response, passed, failed}."""
    rows = load_prompt_set(path, limit)
    prompts = [as_messages(r["prompt"]) for r in rows]
    if augment is not None:
        prompts = [augment(p) for p in prompts]
    responses = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    scores = score_responses(rows, responses)
    failed, passed = [], []
    for row, response in zip(rows, responses, strict=True):
        results = run_checks(row, response)
        example = {
            "prompt": row["prompt"],
            "response": response,
            "passed": all(results),
            "failed": [c["name"] for c, ok in zip(row["checks"], results, strict=True) if not ok],
        }
        (passed if example["passed"] else failed).append(example)
    k = min(len(failed), max(n_examples - len(passed), n_examples // 2))
    scores["examples"] = failed[:k] + passed[: n_examples - k]
    return scores

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

The checks themselves, the registry and the text units they count (words, sentences, list items) live
in constraint_checks.py; their names stay importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from align_jax.data.sources import load_jsonl_rows

# The checks and their registry live in constraint_checks.py; re-exported so this module stays the one
# place callers import the constraint evaluation from.
from align_jax.eval.constraint_checks import CHECKS as CHECKS
from align_jax.eval.constraint_checks import LANGUAGE_SHARE as LANGUAGE_SHARE
from align_jax.eval.constraint_checks import LANGUAGES as LANGUAGES
from align_jax.eval.constraint_checks import SCRIPTS as SCRIPTS
from align_jax.eval.constraint_checks import Check as Check
from align_jax.eval.constraint_checks import all_capitals as all_capitals
from align_jax.eval.constraint_checks import all_lowercase as all_lowercase
from align_jax.eval.constraint_checks import bullet_list as bullet_list
from align_jax.eval.constraint_checks import check as check
from align_jax.eval.constraint_checks import ends_with as ends_with
from align_jax.eval.constraint_checks import exclude_keywords as exclude_keywords
from align_jax.eval.constraint_checks import include_keywords as include_keywords
from align_jax.eval.constraint_checks import json_format as json_format
from align_jax.eval.constraint_checks import language as language
from align_jax.eval.constraint_checks import max_sentences as max_sentences
from align_jax.eval.constraint_checks import max_words as max_words
from align_jax.eval.constraint_checks import min_words as min_words
from align_jax.eval.constraint_checks import no_commas as no_commas
from align_jax.eval.constraint_checks import numbered_list as numbered_list
from align_jax.eval.constraint_checks import script_of as script_of
from align_jax.eval.constraint_checks import sentences as sentences
from align_jax.eval.constraint_checks import starts_with as starts_with
from align_jax.eval.constraint_checks import words as words

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# Short names for the bundled prompt sets.
PROMPT_SETS = {
    "demo": os.path.join(DATA_DIR, "constraints_demo.jsonl"),
    "general": os.path.join(DATA_DIR, "constraints_general.jsonl"),
}
ROLES = ("system", "user", "assistant")
ROW_KEYS = ("prompt", "checks", "category", "reference")

Prompt = str | Sequence[Mapping[str, str]]


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
    return load_jsonl_rows(resolve_prompt_set(path), validate_row, limit)


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

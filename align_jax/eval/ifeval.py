"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models") as its paper
and the official scorer read it out: prompt- and instruction-level accuracy, strict and loose.

Input: IFEval's own JSONL, one prompt a line (the official input_data.jsonl, or the hub's google/IFEval
exported to JSONL; "demo" is a small set written for this project, data/ifeval_demo.jsonl):

    {"key": 1000, "prompt": "Write a 300+ word summary ...",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 300}]}

`kwargs[i]` holds instruction i's arguments; None-valued keys are ignored (the hub's export gives every
row every key, mostly None). The 25 instructions are in ifeval_checks.py.

Scoring, per response:
  strict  each instruction's check on the response as generated (an empty response follows nothing)
  loose   followed if the check passes on any of 8 variants: the response, without its first line,
          without its last line, without both, and each of those with every "*" removed (markdown
          emphasis, and the "Sure, here is..." / "Let me know..." lines models add around an answer)
Read-out: prompt level = the share of prompts whose every instruction is followed; instruction level =
the share of all instructions followed; and per instruction id.

    rows = load_ifeval("demo")
    score_ifeval(rows, responses)                 # -> {"prompt_strict": ..., "inst_loose": ..., ...}
    evaluate_ifeval(ChatModel.load(DIR), "demo")  # generates (1280 new tokens by default), then scores
    write_responses("out.jsonl", rows, responses) # {"prompt", "response"} rows: the official scorer's input
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from align_jax.data.sources import load_jsonl_rows
from align_jax.eval.ifeval_checks import INSTRUCTIONS, RELATIONS

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
IFEVAL_SETS = {"demo": os.path.join(DATA_DIR, "ifeval_demo.jsonl")}
# IFEval runs (the paper, lm-eval's ifeval task) let the model write up to 1280 tokens: a 300+ word essay
# with sections and a postscript needs several hundred.
DEFAULT_MAX_NEW_TOKENS = 1280

Messages = list[dict[str, str]]


# Reading ----------------------------------------------------------------------------------------------


def _bad(where: str, field: str, problem: str) -> ValueError:
    return ValueError(f"{where}, field {field!r}: {problem}")


def _kwarg(where: str, field: str, kind: str, value: Any) -> Any:
    """One kwarg value of the given kind (ifeval_checks.py's module doc), normalised."""
    if kind == "int":
        # The hub's parquet stores these as floats beside its nulls; an integral float is an integer.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(where, field, f"expected an integer >= 0, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise _bad(where, field, f"expected a non-empty string, got {value!r}")
    elif kind == "str_list":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise _bad(where, field, f"expected a non-empty list of non-empty strings, got {value!r}")
    elif kind == "relation":
        if value not in RELATIONS:
            raise _bad(where, field, f"expected one of {list(RELATIONS)}, got {value!r}")
    elif kind == "letter":
        letter = value.strip() if isinstance(value, str) else ""
        if len(letter) != 1 or not (letter.isascii() and letter.isalpha()):
            raise _bad(where, field, f"expected one ASCII letter, got {value!r}")
    else:
        raise AssertionError(f"unknown kwarg kind {kind!r}")
    return value


def _kwargs(where: str, field: str, instruction_id: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise _bad(where, field, f"expected an object of {instruction_id}'s arguments, got {raw!r}")
    params = INSTRUCTIONS[instruction_id].params
    given = {k: v for k, v in raw.items() if v is not None}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise _bad(where, field, f"{instruction_id} takes {sorted(params) or 'no arguments'}; got unknown {unknown}")
    missing = sorted(set(params) - set(given))
    if missing:
        raise _bad(where, field, f"{instruction_id} needs {missing}")
    return {k: _kwarg(where, f"{field}.{k}", params[k], v) for k, v in given.items()}


def validate_row(row: Any, where: str) -> dict[str, Any]:
    """An IFEval input row, checked and normalised: key, prompt, instruction_id_list and kwargs (a list
    of argument dicts, one per instruction, None values dropped). Other fields are ignored."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in row:
            raise _bad(where, field, "missing")
    key, prompt, ids, kwargs = row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]
    if isinstance(key, bool) or not isinstance(key, int):
        raise _bad(where, "key", f"expected an integer, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(where, "prompt", f"expected a non-empty string, got {prompt!r}")
    if not isinstance(ids, list) or not ids:
        raise _bad(where, "instruction_id_list", f"expected a non-empty list of instruction ids, got {ids!r}")
    for i, instruction_id in enumerate(ids):
        if instruction_id not in INSTRUCTIONS:
            raise _bad(
                where,
                f"instruction_id_list[{i}]",
                f"unknown instruction id {instruction_id!r}; known: {sorted(INSTRUCTIONS)}",
            )
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        got = f"{len(kwargs)} entries" if isinstance(kwargs, list) else repr(kwargs)
        raise _bad(where, "kwargs", f"expected a list of {len(ids)} objects, one per instruction id; got {got}")
    return {
        "key": key,
        "prompt": prompt,
        "instruction_id_list": list(ids),
        "kwargs": [_kwargs(where, f"kwargs[{i}]", ids[i], kw) for i, kw in enumerate(kwargs)],
    }


def resolve_ifeval(path: str) -> str:
    """A bundled set's short name ("demo") or a path, as a path."""
    return IFEVAL_SETS.get(path, path)


def load_ifeval(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The validated rows of an IFEval JSONL file (its first `limit` rows when given). A bad row raises
    ValueError naming the file, the line and the field."""
    return load_jsonl_rows(resolve_ifeval(path), validate_row, limit)


# Scoring ----------------------------------------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """The 8 texts the loose score tries (see the module doc), the response itself first."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def follows(row: Mapping[str, Any], response: str, *, loose: bool = False) -> list[bool]:
    """Whether `response` follows each of the row's instructions, in order (strict, or loose)."""
    texts = loose_variants(response) if loose else [response]
    out = []
    for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
        fn = INSTRUCTIONS[instruction_id].fn
        out.append(any(text.strip() and fn(text, **kwargs) for text in texts))
    return out


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def score_ifeval(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """IFEval's read-out of one response per row: prompt_strict, inst_strict, prompt_loose, inst_loose,
    the counts, per_id ({"strict": {id: acc}, "loose": {id: acc}}), and each row's results
    (`follow`: {"strict": [bool, ...], "loose": [bool, ...]})."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} IFEval prompts but {len(responses)} responses")
    out: dict[str, Any] = {"n_prompts": len(rows), "n_instructions": sum(len(r["instruction_id_list"]) for r in rows)}
    follow = [
        {"strict": follows(r, resp), "loose": follows(r, resp, loose=True)}
        for r, resp in zip(rows, responses, strict=True)
    ]
    out["per_id"] = {}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = _rate(sum(all(f[mode]) for f in follow), len(rows))
        out[f"inst_{mode}"] = _rate(sum(sum(f[mode]) for f in follow), out["n_instructions"])
        counts: dict[str, list[int]] = {}
        for row, f in zip(rows, follow, strict=True):
            for instruction_id, ok in zip(row["instruction_id_list"], f[mode], strict=True):
                c = counts.setdefault(instruction_id, [0, 0])
                c[0], c[1] = c[0] + ok, c[1] + 1
        out["per_id"][mode] = {k: ok / n for k, (ok, n) in sorted(counts.items())}
    out["follow"] = follow
    return out


# Generating -------------------------------------------------------------------------------------------


def evaluate_ifeval(
    model: Any,
    path: str,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    augment: Callable[[Messages], Messages] | None = None,
) -> dict[str, Any]:
    """Generates a greedy response to every prompt with `model` (a ChatModel, or anything with its
    `generate`) as a single user turn, and scores them (score_ifeval). `augment` rewrites each prompt's
    messages before generation (PAS); the checks read only the response. Adds `rows` and `responses`."""
    rows = load_ifeval(path, limit)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    if augment is not None:
        prompts = [augment(p) for p in prompts]
    responses = list(model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0))
    scores = score_ifeval(rows, responses)
    scores["rows"], scores["responses"] = rows, responses
    return scores


def write_responses(path: str, rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> None:
    """The responses in IFEval's own output format, {"prompt", "response"} per line in input order,
    written atomically: the official scorer (`evaluation_main --input_response_data=path`) reads it."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row, response in zip(rows, responses, strict=True):
            f.write(json.dumps({"prompt": row["prompt"], "response": response}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

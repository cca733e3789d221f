"""Writes constraints_demo.jsonl (the eval set) and constraints_rl.jsonl (GRPO prompts of the same kinds,
none of them an eval prompt): instruction-following prompts in the tiny demo's domain.

    python -m align_jax.eval.data.make_constraints_demo     # rewrites the file next to this script

The questions come from the demo data's own task generators (align_jax/data/demo/make_demo_data.py),
drawn from a random stream of their own, and each row checks only a form the demo SFT and preference
data teach:

  capitals      "Answer in capital letters: <question>"                  all_capitals, language en
  terse         system "Answer with only the result." + a question        min_words 1, max_words 2
  list          "List three animals." (2-4 items)                        numbered_list n, language en
  upper         "Write <word> in capital letters."                       all_capitals, language en
  say_capitals  a first exchange, then "Now say that in capital letters." all_capitals, language en
  terse_add     the terse system prompt, a numeric first exchange, then
                "Now add k to that."                                      min_words 1, max_words 2
  plain         a question with no instruction beyond the chat itself     language en

Every terse answer is one word or number, so max_words 2 passes every right terse answer and fails
every full sentence ("3 plus 4 is 7." has five words); min_words 1 fails an empty answer (or one of
only symbols, which is what an untrained model tends to emit). all_capitals needs an upper-case letter,
so capitals rows never have a bare number as their answer. The rows check form, not content: whether
"Write castle in capital letters." gets CASTLE is beyond a 0.8M-parameter model (it copies words
letter by letter badly), so include_keywords [castle] would only measure that.

No prompt is in the training data (sft_train, pref_train, rl_train): a row is skipped when its whole
conversation (system prompt, turns) opens a training chat, or when one of its questions is a user text
any training chat has, so no answer can be recalled. The fixed follow-ups ("Now say that in capital
letters.", "Now add k to that.") are exempt: only what they follow is new. So are the list requests and
"Write <word> in capital letters.": the demo's vocabularies are so small that every one of them occurs
in sft_train under each of its system prompts (none, the helpful one, the terse one), so those rows
carry a system prompt the demo never trains on ("You are a friendly assistant."), which also tests
that a taught instruction survives an unseen system prompt. Each row keeps its right answer as
`reference`, and every reference passes its own checks (asserted here and in the tests). Seeded:
re-running reproduces the file byte for byte.

Measured prompt-level accuracy (greedy, 64 new tokens; `launch/evaluate.py --constraints demo`): a
random-init tiny model 0.06, the README's SFT demo model 0.99, its DPO model 0.815 (DPO without an NLL
term lowers the chosen answers' likelihood too, and on some prompts it degenerates into repeated
tokens), the same DPO with `dpo.rpo_alpha=1` 0.985.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Iterable

from align_jax.data import DEMO_DIR
from align_jax.data.demo import make_demo_data as demo
from align_jax.eval.constraints import run_checks, validate_row

SIZE = 200
# Its own stream, apart from the demo files' (SEED, +1, +100, +101, +200, +201).
STREAM = 300
SEED = demo.SEED + STREAM
FILE_NAME = "constraints_demo.jsonl"
# GRPO prompts with checks (the `constraints` reward rule), from a stream of their own.
RL_SIZE = 1000
RL_SEED = SEED + 1
RL_FILE_NAME = "constraints_rl.jsonl"
TRAIN_FILES = ("sft_train.jsonl", "pref_train.jsonl", "rl_train.jsonl")
# System prompts the demo never trains on, for prompts whose user text the demo already has.
UNSEEN_SYSTEMS = (
    "You are a friendly assistant.",
    "You are a careful assistant.",
    "You are a kind and helpful assistant.",
    "Be helpful.",
)
# Category -> weight, so the rows split about evenly (capitals and terse a little more).
CATEGORIES = {
    "capitals": 4,
    "terse": 4,
    "list": 3,
    "upper": 3,
    "say_capitals": 3,
    "terse_add": 3,
    "plain": 3,
}
# The tasks with question spaces large enough for new questions (about 10^4 each; the others, like
# "What is 7 times 8?" or "Reverse the word dog.", all occur in sft_train). Their full answers are short
# sentences with letters, and their terse answers one number.
NEW_QUESTION_TASKS = (demo._add, demo._sub, demo._larger)
# Categories whose every user text is in training (see the module doc), and the fixed follow-up turns.
SMALL_VOCABULARY = ("list", "upper")
FOLLOW_UP = re.compile(r"Now say that in capital letters\.|Now add \d+ to that\.")
EN = {"name": "language", "lang": "en"}
TERSE_CHECKS = [{"name": "min_words", "n": 1}, {"name": "max_words", "n": 2}]
Messages = list[dict[str, str]]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _system(text: str | None) -> Messages:
    return [{"role": "system", "content": text}] if text else []


def _pick(rng: random.Random, tasks: tuple, max_chars: int | None = None) -> tuple[str, str, str]:
    """(question, full, terse) of a task drawn from `tasks`, redrawn until the full answer fits."""
    while True:
        question, full, terse = rng.choice(tasks)(rng)
        if max_chars is None or len(full) <= max_chars:
            return question, full, terse


def make_row(rng: random.Random, category: str) -> dict:
    """One prompt-set row of `category` (see the module doc), with its right answer as `reference`."""
    if category == "capitals":
        question, full, _ = _pick(rng, NEW_QUESTION_TASKS, demo.CAPITALS_MAX_CHARS)
        system = rng.choice((None, None, demo.HELPFUL))
        prompt = [*_system(system), _user(f"Answer in capital letters: {question}")]
        return {"prompt": prompt, "checks": [{"name": "all_capitals"}, EN], "reference": full.upper()}
    if category == "terse":
        question, _, terse = _pick(rng, NEW_QUESTION_TASKS)
        prompt = [*_system(demo.TERSE), _user(question)]
        return {"prompt": prompt, "checks": TERSE_CHECKS, "reference": terse}
    if category == "list":
        question, full, _ = demo._listing(rng)
        prompt = [*_system(rng.choice(UNSEEN_SYSTEMS)), _user(question)]
        n = demo.NUMBER_WORDS[question.split()[1]]
        return {"prompt": prompt, "checks": [{"name": "numbered_list", "n": n}, EN], "reference": full}
    if category == "upper":
        question, full, _ = demo._upper(rng)
        prompt = [*_system(rng.choice(UNSEEN_SYSTEMS)), _user(question)]
        return {"prompt": prompt, "checks": [{"name": "all_capitals"}, EN], "reference": full}
    if category == "say_capitals":
        question, full, _ = _pick(rng, NEW_QUESTION_TASKS, demo.CAPITALS_MAX_CHARS)
        system = rng.choice((None, None, demo.HELPFUL))
        prompt = [*_system(system), _user(question), _assistant(full), _user("Now say that in capital letters.")]
        return {"prompt": prompt, "checks": [{"name": "all_capitals"}, EN], "reference": full.upper()}
    if category == "terse_add":
        question, _, terse = _pick(rng, NEW_QUESTION_TASKS)
        k = rng.randint(1, 20)
        prompt = [*_system(demo.TERSE), _user(question), _assistant(terse), _user(f"Now add {k} to that.")]
        return {"prompt": prompt, "checks": TERSE_CHECKS, "reference": str(int(terse) + k)}
    if category == "plain":
        question, full, _ = _pick(rng, NEW_QUESTION_TASKS)
        system = rng.choice((None, None, demo.HELPFUL))
        return {"prompt": [*_system(system), _user(question)], "checks": [EN], "reference": full}
    raise ValueError(f"unknown category {category!r}")


def _key(messages: Iterable[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages])


def training_prompts(demo_dir: str = DEMO_DIR) -> tuple[set[str], set[str]]:
    """(every conversation that opens a training chat and ends in a user turn, as `_key`s; every user
    text of the training chats): what a model trained on the demo files has seen."""
    prompts: set[str] = set()
    texts: set[str] = set()
    for name in TRAIN_FILES:
        with open(os.path.join(demo_dir, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                messages = row["messages"] if "messages" in row else row["prompt"]
                for i, m in enumerate(messages):
                    if m["role"] == "user":
                        prompts.add(_key(messages[: i + 1]))
                        texts.add(m["content"])
    return prompts, texts


def is_new(row: dict, seen_prompts: set[str], seen_texts: set[str]) -> bool:
    """Whether `row`'s prompt is absent from training, by the rules of the module doc."""
    if _key(row["prompt"]) in seen_prompts:
        return False
    if row["category"] in SMALL_VOCABULARY:
        return True
    questions = [m["content"] for m in row["prompt"] if m["role"] == "user" and not FOLLOW_UP.fullmatch(m["content"])]
    return not any(q in seen_texts for q in questions)


def make_constraints_demo(size: int = SIZE, seed: int = SEED, demo_dir: str = DEMO_DIR) -> list[str]:
    """The JSONL lines of constraints_demo.jsonl."""
    seen, seen_texts = training_prompts(demo_dir)
    return _draw(size, random.Random(seed), seen, seen_texts)


def make_constraints_rl(size: int = RL_SIZE, seed: int = RL_SEED, demo_dir: str = DEMO_DIR) -> list[str]:
    """The JSONL lines of constraints_rl.jsonl: prompts of the same kinds with their checks, for GRPO
    with the `constraints` reward rule (align_jax/rewards.py). Same rules as the eval set, and none of
    them is an eval prompt or asks an eval question, so the eval set stays unseen after RL too."""
    eval_rows = [json.loads(line) for line in make_constraints_demo(demo_dir=demo_dir)]
    seen, seen_texts = training_prompts(demo_dir)
    seen |= {_key(r["prompt"]) for r in eval_rows}
    for r in eval_rows:
        if r["category"] not in SMALL_VOCABULARY:
            seen_texts |= {
                m["content"] for m in r["prompt"] if m["role"] == "user" and not FOLLOW_UP.fullmatch(m["content"])
            }
    return _draw(size, random.Random(seed), seen, seen_texts)


def _draw(size: int, rng: random.Random, seen: set[str], seen_texts: set[str]) -> list[str]:
    names = sorted(CATEGORIES)
    lines: list[str] = []
    while len(lines) < size:
        category = rng.choices(names, weights=[CATEGORIES[c] for c in names])[0]
        row = {"category": category, **make_row(rng, category)}
        if not is_new(row, seen, seen_texts):
            continue
        seen.add(_key(row["prompt"]))
        row = {"prompt": row["prompt"], "checks": row["checks"], "category": category, "reference": row["reference"]}
        checked = validate_row(row, f"generated row {len(lines)}")
        assert all(run_checks(checked, row["reference"])), row  # a right answer passes its own checks
        lines.append(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n")
    return lines


def _write(path: str, lines: list[str]) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return path


def write_constraints_demo(out_dir: str, **kwargs: int) -> str:
    """Writes constraints_demo.jsonl into `out_dir` (atomically); returns its path."""
    return _write(os.path.join(out_dir, FILE_NAME), make_constraints_demo(**kwargs))


def write_constraints_rl(out_dir: str, **kwargs: int) -> str:
    """Writes constraints_rl.jsonl into `out_dir` (atomically); returns its path."""
    return _write(os.path.join(out_dir, RL_FILE_NAME), make_constraints_rl(**kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(write_constraints_demo(args.out, size=args.size, seed=args.seed))
    print(write_constraints_rl(args.out))


if __name__ == "__main__":
    main()

"""Writes the bundled demo data: SFT chats (sft_*.jsonl) and preference pairs (pref_*.jsonl), train and eval.

    python -m align_jax.data.demo.make_demo_data            # rewrites the files next to this script

Seeded, so re-running reproduces every file byte for byte (a test checks). The chats are templated
tasks a ~1-5M-parameter model can visibly learn on a CPU in minutes: regular enough to learn, but each
needs the prompt to be read (arithmetic, reversing and upper-casing words, counting letters, the
larger of two numbers, numbered lists from a small vocabulary, short facts, "answer in capital
letters"). A system prompt asking for "only the result" switches answers to their terse form, and some
chats have a second turn that refers back to the first, so both the system prompt and the history
matter. Every eval chat is absent from the training file.

The preference rows (TRL's conversational form: `prompt` messages ending in a user turn, one-message
`chosen` and `rejected` lists, and on about half the rows UltraFeedback-style 1-10 `chosen_score` and
`rejected_score`) ask the same tasks. `chosen` is the answer the SFT data would give; `rejected` has one
of a mix of failures: content failures in the right form (an arithmetic result off by a little, the
smaller number, a badly reversed word, a wrong count or list, a wrong fact, a wrong answer to a follow-up
that needs the history) and form failures (ignoring "answer in capital letters" or the terse system
prompt, a truncated answer, repeating the question, garbled text). A small reward model learns the form
failures quickly and the content failures partly. The preference files come from their own random
streams, so the SFT files do not change with them. No eval prompt occurs in the training file.

It also writes RL prompts with reference answers (rl_*.jsonl) from the tasks whose terse answer is one
word or number. The tasks and chats are in chat_tasks.py, the preference pairs in preference_pairs.py;
this script draws the files' rows from them and writes the files. Their names stay importable from here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence

# Re-exported (with `as`): the tests, the PAS teacher and the constraints demo read the tasks from here.
from align_jax.data.demo.chat_tasks import CAPITALS_MAX_CHARS as CAPITALS_MAX_CHARS
from align_jax.data.demo.chat_tasks import CATEGORIES as CATEGORIES
from align_jax.data.demo.chat_tasks import COUNT_WORDS as COUNT_WORDS
from align_jax.data.demo.chat_tasks import FACTS as FACTS
from align_jax.data.demo.chat_tasks import HELPFUL as HELPFUL
from align_jax.data.demo.chat_tasks import TASKS as TASKS
from align_jax.data.demo.chat_tasks import TERSE as TERSE
from align_jax.data.demo.chat_tasks import WORDS as WORDS
from align_jax.data.demo.chat_tasks import Task as Task
from align_jax.data.demo.chat_tasks import _add as _add
from align_jax.data.demo.chat_tasks import _fact as _fact
from align_jax.data.demo.chat_tasks import _larger as _larger
from align_jax.data.demo.chat_tasks import _length as _length
from align_jax.data.demo.chat_tasks import _letter_count as _letter_count
from align_jax.data.demo.chat_tasks import _listing as _listing
from align_jax.data.demo.chat_tasks import _mul as _mul
from align_jax.data.demo.chat_tasks import _reverse as _reverse
from align_jax.data.demo.chat_tasks import _sub as _sub
from align_jax.data.demo.chat_tasks import _upper as _upper
from align_jax.data.demo.chat_tasks import make_chat as make_chat
from align_jax.data.demo.preference_pairs import CHOSEN_SCORES as CHOSEN_SCORES
from align_jax.data.demo.preference_pairs import CONTENT_FAILURES as CONTENT_FAILURES
from align_jax.data.demo.preference_pairs import CONTENT_TASKS as CONTENT_TASKS
from align_jax.data.demo.preference_pairs import FAILURE_WEIGHTS as FAILURE_WEIGHTS
from align_jax.data.demo.preference_pairs import FORMAT_FAILURES as FORMAT_FAILURES
from align_jax.data.demo.preference_pairs import NUMBER_WORDS as NUMBER_WORDS
from align_jax.data.demo.preference_pairs import REJECTED_SCORES as REJECTED_SCORES
from align_jax.data.demo.preference_pairs import SCORED_FRACTION as SCORED_FRACTION
from align_jax.data.demo.preference_pairs import WRONG_FACTS as WRONG_FACTS
from align_jax.data.demo.preference_pairs import Messages as Messages
from align_jax.data.demo.preference_pairs import make_pref_pair as make_pref_pair

TRAIN_SIZE = 20_000
EVAL_SIZE = 500
SEED = 20241018
PREF_TRAIN_SIZE = 4800
PREF_EVAL_SIZE = 300
# The preference files draw from streams SEED + PREF_STREAM (train) and SEED + PREF_STREAM + 1 (eval).
PREF_STREAM = 100
RL_TRAIN_SIZE = 2000
RL_EVAL_SIZE = 200
RL_STREAM = 200  # seed offset of the RL prompt files' own random streams
# Tasks whose terse answer is one word or number, so a rule can check a sampled response for it.
RL_TASKS = (_add, _sub, _mul, _larger, _reverse, _upper, _length, _letter_count)


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


def _prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True)


def _write_files(
    out_dir: str, names: tuple[str, str], contents: tuple[Sequence[str], Sequence[str]]
) -> tuple[str, str]:
    """Writes each file's lines into `out_dir` with "\\n" line ends on every platform (the files are
    compared byte for byte); returns the paths."""
    paths = os.path.join(out_dir, names[0]), os.path.join(out_dir, names[1])
    for path, lines in zip(paths, contents, strict=True):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    return paths


# SFT chats ----------------------------------------------------------------------------------------------


def make_demo_data(
    train_size: int = TRAIN_SIZE, eval_size: int = EVAL_SIZE, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """The JSONL lines of the train and eval files. Eval draws from its own stream and skips any chat
    that is also in train, so eval measures generalisation, not recall."""
    rng = random.Random(seed)
    train = [_line(make_chat(rng)) for _ in range(train_size)]
    seen = set(train)
    rng = random.Random(seed + 1)
    eval_lines: list[str] = []
    while len(eval_lines) < eval_size:
        line = _line(make_chat(rng))
        if line not in seen:
            seen.add(line)
            eval_lines.append(line)
    return train, eval_lines


def write_demo_data(out_dir: str, **kwargs: int) -> tuple[str, str]:
    """Writes sft_train.jsonl and sft_eval.jsonl into `out_dir`; returns their paths."""
    return _write_files(out_dir, ("sft_train.jsonl", "sft_eval.jsonl"), make_demo_data(**kwargs))


# Preference pairs ---------------------------------------------------------------------------------------


def make_pref_rows(
    train_size: int = PREF_TRAIN_SIZE, eval_size: int = PREF_EVAL_SIZE, seed: int = SEED
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(failure kind, JSONL line) for the preference train and eval files. Each file has its own stream,
    apart from the SFT files'; eval skips any prompt train (or earlier eval) has."""
    rng = random.Random(seed + PREF_STREAM)
    train_rows = [make_pref_pair(rng) for _ in range(train_size)]
    seen = {_prompt_key(row) for _, row in train_rows}
    rng = random.Random(seed + PREF_STREAM + 1)
    eval_rows: list[tuple[str, str]] = []
    while len(eval_rows) < eval_size:
        kind, row = make_pref_pair(rng)
        key = _prompt_key(row)
        if key not in seen:
            seen.add(key)
            eval_rows.append((kind, _line(row)))
    return [(kind, _line(row)) for kind, row in train_rows], eval_rows


def make_pref_data(
    train_size: int = PREF_TRAIN_SIZE, eval_size: int = PREF_EVAL_SIZE, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """The JSONL lines of pref_train.jsonl and pref_eval.jsonl."""
    train, eval_rows = make_pref_rows(train_size, eval_size, seed)
    return [line for _, line in train], [line for _, line in eval_rows]


def write_pref_data(out_dir: str, **kwargs: int) -> tuple[str, str]:
    """Writes pref_train.jsonl and pref_eval.jsonl into `out_dir`; returns their paths."""
    return _write_files(out_dir, ("pref_train.jsonl", "pref_eval.jsonl"), make_pref_data(**kwargs))


# RL prompts ---------------------------------------------------------------------------------------------


def make_rl_prompt(rng: random.Random) -> dict:
    """One RL prompt with its reference answer: {"prompt": [messages], "answer": str}. A rule reward
    (align_jax/rewards.py, exact_match) checks that a response states the answer."""
    fn = rng.choice(RL_TASKS)
    question, _, terse = fn(rng)
    if rng.random() < 0.15:
        question, terse = f"Answer in capital letters: {question}", terse.upper()
    system = TERSE if rng.random() < 0.2 else None
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "answer": terse}


def make_rl_data(
    train_size: int = RL_TRAIN_SIZE, eval_size: int = RL_EVAL_SIZE, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """The JSONL lines of rl_train.jsonl and rl_eval.jsonl; eval prompts are absent from train."""
    rng = random.Random(seed + RL_STREAM)
    train = [make_rl_prompt(rng) for _ in range(train_size)]
    seen = {_prompt_key(row) for row in train}
    rng = random.Random(seed + RL_STREAM + 1)
    eval_rows: list[dict] = []
    while len(eval_rows) < eval_size:
        row = make_rl_prompt(rng)
        if _prompt_key(row) not in seen:
            seen.add(_prompt_key(row))
            eval_rows.append(row)
    return [_line(r) for r in train], [_line(r) for r in eval_rows]


def write_rl_data(out_dir: str, **kwargs: int) -> tuple[str, str]:
    """Writes rl_train.jsonl and rl_eval.jsonl into `out_dir`; returns their paths."""
    return _write_files(out_dir, ("rl_train.jsonl", "rl_eval.jsonl"), make_rl_data(**kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--train", type=int, default=TRAIN_SIZE)
    parser.add_argument("--eval", type=int, default=EVAL_SIZE)
    parser.add_argument("--pref-train", type=int, default=PREF_TRAIN_SIZE)
    parser.add_argument("--pref-eval", type=int, default=PREF_EVAL_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    paths = write_demo_data(args.out, train_size=args.train, eval_size=args.eval, seed=args.seed)
    paths += write_pref_data(args.out, train_size=args.pref_train, eval_size=args.pref_eval, seed=args.seed)
    paths += write_rl_data(args.out, seed=args.seed)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()

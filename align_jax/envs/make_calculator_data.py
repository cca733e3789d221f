"""Writes the calculator demo's data: tool-use SFT chats and RL prompts (align_jax/envs/data/).

    python -m align_jax.envs.make_calculator_data      # rewrites the files in align_jax/envs/data/

Seeded, so re-running reproduces every file byte for byte (a test checks). The problems are templated
word problems (a product, a sum, a difference, a fair share, a two-step total) with small numbers that a
0.8M-parameter model can copy from the problem into an expression; their results (up to a few hundred)
are what it cannot work out in its head.

calculator_sft.jsonl / calculator_sft_eval.jsonl: chats in the `messages` format (system / user /
assistant only, what the SFT reader takes). The system prompt is CalculatorEnv's, so SFT sees the very
chat the environment starts an RL episode with. Some chats use the calculator:

    assistant  <calc>12*7</calc>
    user       12*7 = 84                   the environment's tool message, text as CalculatorEnv writes it
    assistant  84

and the rest answer at once (`84`), in a share that differs by kind of problem (TEMPLATES): most
products, differences, fair shares and two-step totals go through the calculator, one sum or seat count
in ten does. A mix, as SFT data gathered from several sources is; the SFT model then calls the tool on
some kinds and guesses on the others, so RL has something to find: episodes that call the tool are right
far more often, and GRPO spreads the calls to every kind (configs/grpo.py:calculator_tiny has the
measured curve). The tool message sits in a user turn because the SFT reader has no tool role;
align_jax/envs/base.py sends it under the role the chat template renders (for the demo's ChatML
tokenizer, "tool").

calculator_train.jsonl / calculator_eval.jsonl: RL prompt rows {"prompt", "answer", "expression"} from
the same templates, each from its own random stream; no eval problem is in the RL train file or in the
SFT files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Sequence

from align_jax.envs.calculator import SYSTEM_PROMPT, evaluate, format_number

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SEED = 20250611
SFT_SIZE, SFT_EVAL_SIZE = 4000, 200
RL_TRAIN_SIZE, RL_EVAL_SIZE = 2000, 200
# Each file draws from stream SEED + offset, so resizing one file redraws none of the others (an eval
# file may then skip other duplicates of training problems).
STREAMS = {"calculator_sft": 0, "calculator_sft_eval": 1, "calculator_train": 2, "calculator_eval": 3}

NAMES = ("Sam", "Ana", "Leo", "Mia", "Tom", "Ivy", "Max", "Zoe", "Ben", "Eva")
THINGS = ("apples", "cards", "pens", "stickers", "shells", "coins", "books", "marbles")
BOXES = (("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("jar", "jars"), ("pack", "packs"), ("tray", "trays"))
HALLS = ("hall", "cinema", "theatre", "church", "classroom")


def _product(rng: random.Random) -> tuple[str, str]:
    a, b, (box, boxes), thing = rng.randint(11, 49), rng.randint(3, 9), rng.choice(BOXES), rng.choice(THINGS)
    return f"A {box} holds {a} {thing}. How many {thing} are in {b} {boxes}?", f"{a}*{b}"


def _rows(rng: random.Random) -> tuple[str, str]:
    a, b, hall, seat = rng.randint(3, 9), rng.randint(12, 59), rng.choice(HALLS), rng.choice(("seats", "chairs"))
    return f"A {hall} has {a} rows of {b} {seat}. How many {seat} is that?", f"{a}*{b}"


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b, name, thing = rng.randint(25, 99), rng.randint(25, 99), rng.choice(NAMES), rng.choice(THINGS)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", f"{a}+{b}"


def _difference(rng: random.Random) -> tuple[str, str]:
    a, name, thing = rng.randint(50, 199), rng.choice(NAMES), rng.choice(THINGS)
    b = rng.randint(12, a - 11)
    return f"{name} has {a} {thing} and gives away {b}. How many are left?", f"{a}-{b}"


def _share(rng: random.Random) -> tuple[str, str]:
    b, each, thing = rng.randint(3, 9), rng.randint(11, 39), rng.choice(THINGS)
    return f"{b * each} {thing} are shared equally by {b} friends. How many does each get?", f"{b * each}/{b}"


def _two_step(rng: random.Random) -> tuple[str, str]:
    a, b, c, name = rng.randint(3, 9), rng.randint(11, 29), rng.randint(10, 60), rng.choice(NAMES)
    return f"{name} buys {a} tickets at {b} dollars each and pays {c} dollars for food. What is the total?", (
        f"{a}*{b}+{c}"
    )


# (problem maker, the share of its SFT chats that call the calculator): the rest answer at once. The
# shares differ by kind, as if the transcripts' authors reached for the calculator on the problems that
# look hard and not on the sums and seat counts; see the module docstring.
TEMPLATES: tuple[tuple[Callable[[random.Random], tuple[str, str]], float], ...] = (
    (_product, 0.7),
    (_rows, 0.1),
    (_sum, 0.1),
    (_difference, 0.6),
    (_share, 0.6),
    (_two_step, 0.7),
)


def _draw(rng: random.Random) -> tuple[dict, float]:
    make, tool_share = rng.choice(TEMPLATES)
    prompt, expression = make(rng)
    return {"prompt": prompt, "answer": format_number(evaluate(expression)), "expression": expression}, tool_share


def make_problem(rng: random.Random) -> dict:
    """One RL row: {"prompt", "answer", "expression"}, the answer as the calculator writes it."""
    return _draw(rng)[0]


def make_chat(rng: random.Random) -> dict:
    """One SFT chat on a fresh problem: through the calculator (its kind's share of them) or answered at once."""
    row, tool_share = _draw(rng)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["prompt"]}]
    if rng.random() < tool_share:
        # The tool line is run_calls' text for a well-formed call: "EXPR = RESULT".
        messages += [
            {"role": "assistant", "content": f"<calc>{row['expression']}</calc>"},
            {"role": "user", "content": f"{row['expression']} = {row['answer']}"},
        ]
    messages.append({"role": "assistant", "content": row["answer"]})
    return {"messages": messages}


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


def _problem_of(record: dict) -> str:
    return record["prompt"] if "prompt" in record else record["messages"][1]["content"]


def make_files(seed: int = SEED) -> dict[str, list[str]]:
    """Each file's JSONL lines, by name. Eval files are drawn last and skip every problem already drawn
    for a training file, so eval measures the templates learnt rather than problems recalled."""
    sizes = {
        "calculator_sft": SFT_SIZE,
        "calculator_train": RL_TRAIN_SIZE,
        "calculator_sft_eval": SFT_EVAL_SIZE,
        "calculator_eval": RL_EVAL_SIZE,
    }
    makers = {"calculator_sft": make_chat, "calculator_sft_eval": make_chat}
    seen: set[str] = set()
    files: dict[str, list[str]] = {}
    for name, size in sizes.items():
        rng, held_out = random.Random(seed + STREAMS[name]), name.endswith("eval")
        make, lines = makers.get(name, make_problem), []
        while len(lines) < size:
            record = make(rng)
            if held_out and _problem_of(record) in seen:
                continue
            if held_out:  # nor twice in eval
                seen.add(_problem_of(record))
            lines.append(_line(record))
        if not held_out:
            seen.update(_problem_of(json.loads(line)) for line in lines)
        files[name] = lines
    return files


def write_files(out_dir: str = DATA_DIR, seed: int = SEED) -> list[str]:
    """Writes every file into `out_dir` with "\\n" line ends (they are compared byte for byte); returns
    the paths."""
    paths = []
    for name, lines in make_files(seed).items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in write_files(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()

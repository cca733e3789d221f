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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Callable

TRAIN_SIZE = 20_000
EVAL_SIZE = 500
SEED = 20241018
PREF_TRAIN_SIZE = 4800
PREF_EVAL_SIZE = 300
# The preference files draw from streams SEED + PREF_STREAM (train) and SEED + PREF_STREAM + 1 (eval).
PREF_STREAM = 100


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


WORDS = _words(
    "apple bread chair cloud dance earth flame ghost green honey house juice kite lemon light magic "
    "money night ocean paper piano plant queen river robot salt sheep smile snake stone sugar table "
    "tiger train water whale yellow zebra book cat dog fish bird moon star tree rain snow wind ship "
    "road door key cup pen hat box sun sky milk egg ant bee owl fox wolf bear frog duck goat horse"
)
CATEGORIES = {
    "colors": _words("red blue green yellow black white orange purple pink brown"),
    "animals": _words("cat dog cow horse sheep goat duck frog bear wolf fox owl"),
    "fruits": _words("apple banana cherry grape lemon mango orange peach pear plum"),
    "tools": _words("hammer saw drill wrench shovel rake knife ruler"),
}
FACTS = (
    ("What color is the sky?", "The sky is blue."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What animal says moo?", "A cow says moo."),
    ("What animal says woof?", "A dog says woof."),
    ("What animal says meow?", "A cat says meow."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("How many legs does a bird have?", "A bird has 2 legs."),
    ("How many days are in a week?", "A week has 7 days."),
    ("How many months are in a year?", "A year has 12 months."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water?", "Frozen water is ice."),
)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
HELPFUL = "You are a helpful assistant."
CAPITALS_MAX_CHARS = 20
TERSE = "Answer with only the result."

# A task draws (question, full answer, terse answer) from the generator.
Task = Callable[[random.Random], tuple[str, str, str]]


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", str(a - b)


def _mul(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b)


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger.", str(max(a, b))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word {w}.", f"{w} reversed is {w[::-1]}.", w[::-1]


def _upper(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"Write {w} in capital letters.", w.upper(), w.upper()


def _length(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"How many letters are in {w}?", f"{w} has {len(w)} letters.", str(len(w))


def _letter_count(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    # Mostly letters that occur in the word, sometimes one that does not (answer 0).
    c = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    k = w.count(c)
    times = "time" if k == 1 else "times"
    return f"How many times does the letter {c} appear in {w}?", f"The letter {c} appears {k} {times} in {w}.", str(k)


def _listing(rng: random.Random) -> tuple[str, str, str]:
    name = rng.choice(sorted(CATEGORIES))
    n = rng.randint(2, 4)
    items = rng.sample(CATEGORIES[name], n)
    numbered = "\n".join(f"{i}. {x}" for i, x in enumerate(items, start=1))
    return f"List {COUNT_WORDS[n]} {name}.", numbered, ", ".join(items)


def _fact(rng: random.Random) -> tuple[str, str, str]:
    q, a = rng.choice(FACTS)
    return q, a, a


TASKS: tuple[tuple[Task, int], ...] = (
    (_add, 4),
    (_sub, 3),
    (_mul, 2),
    (_larger, 2),
    (_reverse, 3),
    (_upper, 2),
    (_length, 2),
    (_letter_count, 2),
    (_listing, 2),
    (_fact, 1),
)


def _task(rng: random.Random, second_turn: bool = False) -> tuple[str, str, str]:
    # Lists are the longest answers and capitals cost about a token per letter; keeping both out of
    # second turns, and capitals to short answers, keeps every chat under 100 tokens with a 512-token BPE.
    tasks = [(t, w) for t, w in TASKS if not (second_turn and t is _listing)]
    fn = rng.choices([t for t, _ in tasks], weights=[w for _, w in tasks])[0]
    question, full, terse = fn(rng)
    if not second_turn and len(full) <= CAPITALS_MAX_CHARS and fn is not _listing and rng.random() < 0.15:
        # The constraint applies to whatever the answer would have been.
        return f"Answer in capital letters: {question}", full.upper(), terse.upper()
    return question, full, terse


def _follow_up(rng: random.Random, answer: str, previous_number: int | None) -> tuple[str, str, str]:
    """A second user turn; some need the first answer (the history), some do not."""
    roll = rng.random()
    if previous_number is not None and roll < 0.4:
        k = rng.randint(1, 20)
        return (
            f"Now add {k} to that.",
            f"{previous_number} plus {k} is {previous_number + k}.",
            str(previous_number + k),
        )
    if roll < 0.7 and answer != answer.upper() and len(answer) <= CAPITALS_MAX_CHARS and "\n" not in answer:
        upper = answer.upper()
        return "Now say that in capital letters.", upper, upper
    return _task(rng, second_turn=True)


def make_chat(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One demo chat as a canonical `messages` record."""
    roll = rng.random()
    system = None if roll < 0.6 else HELPFUL if roll < 0.85 else TERSE
    terse = system == TERSE
    messages = [{"role": "system", "content": system}] if system else []
    question, full, short = _task(rng)
    answer = short if terse else full
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    # A numbered list is long already; it gets no second turn.
    if rng.random() < 0.25 and "\n" not in answer:
        number = int(short) if short.isdigit() else None
        question, full, short = _follow_up(rng, answer, number)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": short if terse else full}]
    return {"messages": messages}


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


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
    train, eval_lines = make_demo_data(**kwargs)
    paths = os.path.join(out_dir, "sft_train.jsonl"), os.path.join(out_dir, "sft_eval.jsonl")
    for path, lines in zip(paths, (train, eval_lines), strict=True):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    return paths


# Preference pairs ----------------------------------------------------------------------------------------

# What is wrong with a row's rejected answer, and how often each kind is drawn. The content failures keep
# the chosen answer's form (so only reading the prompt tells them apart); the rest get the form wrong.
CONTENT_FAILURES = (
    "wrong_arithmetic",
    "smaller_number",
    "bad_reversal",
    "wrong_count",
    "wrong_list",
    "wrong_fact",
    "wrong_follow_up",
)
FORMAT_FAILURES = ("ignored_capitals", "ignored_terse", "truncated", "repeated_question", "garbled")
FAILURE_WEIGHTS = {
    "wrong_arithmetic": 13,
    "smaller_number": 6,
    "bad_reversal": 7,
    "wrong_count": 7,
    "wrong_list": 4,
    "wrong_fact": 4,
    "wrong_follow_up": 9,
    "ignored_capitals": 8,
    "ignored_terse": 8,
    "truncated": 9,
    "repeated_question": 8,
    "garbled": 7,
}
# UltraFeedback-like 1-10 ratings in half points. Chosen answers score 8-10; a rejected one scores by what
# is wrong with it: right content in the wrong form > wrong content in the right form > an incomplete
# answer > an echo of the question > garbage. So the scores say more than which answer is better.
CHOSEN_SCORES = (8.0, 10.0)
REJECTED_SCORES = {
    **dict.fromkeys(CONTENT_FAILURES, (4.0, 6.0)),
    "ignored_capitals": (6.0, 7.0),
    "ignored_terse": (6.0, 7.0),
    "truncated": (2.5, 3.5),
    "repeated_question": (1.5, 2.5),
    "garbled": (1.0, 2.0),
}
SCORED_FRACTION = 0.5
# The task generators each content failure (other than the follow-up) is drawn from.
CONTENT_TASKS: dict[str, tuple[Task, ...]] = {
    "wrong_arithmetic": (_add, _sub, _mul),
    "smaller_number": (_larger,),
    "bad_reversal": (_reverse,),
    "wrong_count": (_length, _letter_count),
    "wrong_list": (_listing,),
    "wrong_fact": (_fact,),
}
WRONG_FACTS = {
    "What color is the sky?": "The sky is green.",
    "What color is grass?": "Grass is blue.",
    "What color is snow?": "Snow is black.",
    "What animal says moo?": "A dog says moo.",
    "What animal says woof?": "A cat says woof.",
    "What animal says meow?": "A cow says meow.",
    "How many legs does a dog have?": "A dog has 2 legs.",
    "How many legs does a bird have?": "A bird has 4 legs.",
    "How many days are in a week?": "A week has 5 days.",
    "How many months are in a year?": "A year has 10 months.",
    "What do bees make?": "Bees make milk.",
    "What is frozen water?": "Frozen water is salt.",
}
NUMBER_WORDS = {word: n for n, word in COUNT_WORDS.items()}
Messages = list[dict[str, str]]


def _near(rng: random.Random, n: int, steps: tuple[int, ...], low: int = 0) -> int:
    """n moved by one of `steps`, staying >= low."""
    return rng.choice([n + s for s in steps if n + s >= low])


def _misreverse(rng: random.Random, word: str) -> str:
    """The word reversed with a slip: two neighbouring letters swapped, or a letter lost."""
    right = word[::-1]
    swaps = [i for i in range(len(right) - 1) if right[i] != right[i + 1]]
    if rng.random() < 0.7 and swaps:
        i = rng.choice(swaps)
        return right[:i] + right[i + 1] + right[i] + right[i + 2 :]
    i = rng.randrange(len(right))
    return right[:i] + right[i + 1 :]


def _wrong_answer(fn: Task, rng: random.Random, question: str, full: str, terse: str) -> tuple[str, str]:
    """A wrong (full, terse) answer to the question `fn` asked, in the same form as the right one."""
    if fn in (_add, _sub, _mul):
        wrong = _near(rng, int(terse), (-2, -1, 1, 2) if fn is _mul else (-10, -2, -1, 1, 2, 10))
        return f"{full.rsplit(' is ', 1)[0]} is {wrong}.", str(wrong)
    if fn is _larger:
        smaller = str(min(int(n) for n in re.findall(r"\d+", question)))
        return f"{smaller} is larger.", smaller
    if fn is _reverse:
        word = question.split()[-1].rstrip(".")
        wrong = word if rng.random() < 0.35 else _misreverse(rng, word)  # not reversed at all, or badly
        return f"{word} reversed is {wrong}.", wrong
    if fn is _length:
        word = question.split()[-1].rstrip("?")
        n = _near(rng, len(word), (-2, -1, 1, 2), low=1)
        return f"{word} has {n} letters.", str(n)
    if fn is _letter_count:
        match = re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", question)
        assert match, question
        letter, word = match.groups()
        k = _near(rng, int(terse), (-1, 1, 2))
        return f"The letter {letter} appears {k} {'time' if k == 1 else 'times'} in {word}.", str(k)
    if fn is _listing:
        _, count, name = question.rstrip(".").split()
        items = terse.split(", ")
        if rng.random() < 0.5:  # the wrong number of items
            extra = [x for x in CATEGORIES[name] if x not in items]
            items = items[:-1] if rng.random() < 0.5 else [*items, rng.choice(extra)]
        else:  # items of another category
            other = rng.choice([c for c in sorted(CATEGORIES) if c != name])
            items = rng.sample([x for x in CATEGORIES[other] if x not in CATEGORIES[name]], NUMBER_WORDS[count])
        return "\n".join(f"{i}. {x}" for i, x in enumerate(items, start=1)), ", ".join(items)
    if fn is _fact:
        return WRONG_FACTS[question], WRONG_FACTS[question]
    raise ValueError(f"no wrong answer for {fn.__name__}")


def _garble(rng: random.Random, text: str) -> str:
    """A short sentence's letters scrambled within each word, or a salad of vocabulary words. (A scrambled
    one-word answer, "29" -> "92", would be a wrong answer rather than a garbled one; a long scrambled
    sentence costs a token per letter.)"""
    scrambled = " ".join("".join(rng.sample(w, len(w))) for w in text.split())
    if rng.random() < 0.5 and len(text.split()) >= 3 and len(text) <= 24 and scrambled != text:
        return scrambled
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))


def _follow_up_pair(rng: random.Random, terse: bool) -> tuple[Messages, str, str] | None:
    """A two-turn chat whose second question needs the first answer; rejected gets it wrong."""
    question, full, short = _task(rng)
    answer = short if terse else full
    if "\n" in answer:
        return None
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if short.isdigit() and rng.random() < 0.6:
        previous, k = int(short), rng.randint(1, 20)
        follow_up = f"Now add {k} to that."
        if rng.random() < 0.5:  # the sum slips
            base, total = previous, _near(rng, previous + k, (-10, -2, -1, 1, 2, 10))
        else:  # the earlier answer is misremembered
            base = _near(rng, previous, (-10, -2, -1, 1, 2, 10))
            total = base + k
        chosen = str(previous + k) if terse else f"{previous} plus {k} is {previous + k}."
        rejected = str(total) if terse else f"{base} plus {k} is {total}."
    elif answer != answer.upper() and len(answer) <= CAPITALS_MAX_CHARS:
        follow_up = "Now say that in capital letters."
        chosen, rejected = answer.upper(), answer  # said again, unchanged
    else:
        return None
    return [*history, {"role": "user", "content": follow_up}], chosen, rejected


def _pair(rng: random.Random, kind: str, system: str | None) -> tuple[Messages, str, str] | None:
    """(prompt turns after the system prompt, chosen, rejected) with a `kind` failure, or None when this
    draw cannot show one (the caller draws again)."""
    terse = system == TERSE
    if kind == "wrong_follow_up":
        return _follow_up_pair(rng, terse)
    history: Messages = []
    # Some chats have an unrelated earlier exchange; lists and capitals stay out of second turns (length).
    if kind not in ("wrong_list", "ignored_capitals") and rng.random() < 0.15:
        question, full, short = _task(rng)
        answer = short if terse else full
        if "\n" in answer:
            return None
        history = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    fns = [t for t in CONTENT_TASKS.get(kind, [t for t, _ in TASKS]) if not (history and t is _listing)]
    weights = dict(TASKS)
    fn = rng.choices(fns, weights=[weights[t] for t in fns])[0]
    question, full, short = fn(rng)
    capitals = not history and len(full) <= CAPITALS_MAX_CHARS and fn is not _listing and rng.random() < 0.15
    prompt = [*history, {"role": "user", "content": f"Answer in capital letters: {question}" if capitals else question}]

    def form(full_answer: str, terse_answer: str) -> str:
        answer = terse_answer if terse else full_answer
        return answer.upper() if capitals else answer

    chosen = form(full, short)
    if kind in CONTENT_TASKS:
        rejected = form(*_wrong_answer(fn, rng, question, full, short))
    elif kind == "ignored_capitals":
        if capitals:
            rejected = short if terse else full
        elif fn is _upper:  # "Write apple in capital letters." answered in lower case
            rejected = chosen.lower()
        else:
            return None
    elif kind == "ignored_terse":
        if not terse:
            return None
        rejected = form(full, full)
    elif kind == "truncated":
        # Cut off at a space, so even a list stops mid-item; "9 times 7 is 63." cut to "63" is no
        # truncation but the terse answer, so that cut is left out.
        cuts = [i for i, ch in enumerate(chosen) if ch == " " and chosen[:i].lower() != short.lower()]
        if len(cuts) < 2:
            return None
        rejected = chosen[: rng.choice(cuts)]
    elif kind == "repeated_question":
        rejected = prompt[-1]["content"]
    elif kind == "garbled":
        rejected = _garble(rng, chosen)
    else:
        raise ValueError(f"unknown failure kind {kind!r}")
    return (prompt, chosen, rejected) if rejected != chosen else None


def make_pref_pair(rng: random.Random) -> tuple[str, dict]:
    """(failure kind, row): one TRL conversational preference row and what is wrong with its rejected
    answer (the kind is not part of the row)."""
    kinds = sorted(FAILURE_WEIGHTS)
    kind = rng.choices(kinds, weights=[FAILURE_WEIGHTS[k] for k in kinds])[0]
    while True:
        roll = rng.random()
        # Fewer system prompts than the SFT chats have, to keep the files small; ignored_terse needs one.
        system = TERSE if kind == "ignored_terse" else None if roll < 0.72 else HELPFUL if roll < 0.86 else TERSE
        pair = _pair(rng, kind, system)
        if pair is not None:
            break
    turns, chosen, rejected = pair
    row: dict = {
        "prompt": ([{"role": "system", "content": system}] if system else []) + turns,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if rng.random() < SCORED_FRACTION:
        (clo, chi), (rlo, rhi) = CHOSEN_SCORES, REJECTED_SCORES[kind]
        row["chosen_score"] = rng.randint(int(2 * clo), int(2 * chi)) / 2
        row["rejected_score"] = rng.randint(int(2 * rlo), int(2 * rhi)) / 2
    return kind, row


def _prompt_key(row: dict) -> str:
    return json.dumps(row["prompt"], sort_keys=True)


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
    train, eval_lines = make_pref_data(**kwargs)
    paths = os.path.join(out_dir, "pref_train.jsonl"), os.path.join(out_dir, "pref_eval.jsonl")
    for path, lines in zip(paths, (train, eval_lines), strict=True):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    return paths


RL_TRAIN_SIZE = 2000
RL_EVAL_SIZE = 200
RL_STREAM = 200  # seed offset of the RL prompt files' own random streams
# Tasks whose terse answer is one word or number, so a rule can check a sampled response for it.
RL_TASKS = (_add, _sub, _mul, _larger, _reverse, _upper, _length, _letter_count)


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
    train, eval_lines = make_rl_data(**kwargs)
    paths = os.path.join(out_dir, "rl_train.jsonl"), os.path.join(out_dir, "rl_eval.jsonl")
    for path, lines in zip(paths, (train, eval_lines), strict=True):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    return paths


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

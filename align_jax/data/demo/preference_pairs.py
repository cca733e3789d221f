"""The demo's preference pairs: a chosen answer (what the SFT data would say) and a rejected one with a
known failure, drawn from the same tasks as the chats (chat_tasks.py).

Content failures keep the chosen answer's form, so only reading the prompt tells them apart (an
arithmetic result off by a little, the smaller number, a badly reversed word, a wrong count or list, a
wrong fact, a wrong answer to a follow-up that needs the history); form failures get the form wrong
(ignoring "answer in capital letters" or the terse system prompt, a truncated answer, repeating the
question, garbled text). About half the rows carry UltraFeedback-style 1-10 scores that rank the failures.
"""

from __future__ import annotations

import dataclasses
import random
import re

from align_jax.data.demo.chat_tasks import (
    CAPITALS_MAX_CHARS,
    CATEGORIES,
    COUNT_WORDS,
    HELPFUL,
    TASKS,
    TERSE,
    WORDS,
    Task,
    _add,
    _fact,
    _larger,
    _length,
    _letter_count,
    _listing,
    _mul,
    _reverse,
    _sub,
    _task,
    _upper,
)

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


def _wrong_list(rng: random.Random, question: str, terse: str) -> tuple[str, str]:
    """A wrong numbered list: one item too few or too many, or items of another category."""
    _, count, name = question.rstrip(".").split()
    items = terse.split(", ")
    if rng.random() < 0.5:  # the wrong number of items
        extra = [x for x in CATEGORIES[name] if x not in items]
        items = items[:-1] if rng.random() < 0.5 else [*items, rng.choice(extra)]
    else:  # items of another category
        other = rng.choice([c for c in sorted(CATEGORIES) if c != name])
        items = rng.sample([x for x in CATEGORIES[other] if x not in CATEGORIES[name]], NUMBER_WORDS[count])
    return "\n".join(f"{i}. {x}" for i, x in enumerate(items, start=1)), ", ".join(items)


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
        return _wrong_list(rng, question, terse)
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


@dataclasses.dataclass(frozen=True)
class _Asked:
    """The drawn question of a pair's last turn and the form its answers must take (terse system prompt,
    "answer in capital letters"), which both the chosen and the rejected answer follow."""

    fn: Task
    question: str
    full: str
    short: str
    terse: bool
    capitals: bool

    def form(self, full_answer: str, terse_answer: str) -> str:
        answer = terse_answer if self.terse else full_answer
        return answer.upper() if self.capitals else answer


def _earlier_exchange(rng: random.Random, kind: str, terse: bool) -> Messages | None:
    """Sometimes an unrelated earlier exchange, so that pairs are not all single-turn; `[]` without one,
    None when the draw was a list (too long for a first turn: the caller draws again)."""
    # Lists and capitals stay out of second turns (length).
    if kind in ("wrong_list", "ignored_capitals") or rng.random() >= 0.15:
        return []
    question, full, short = _task(rng)
    answer = short if terse else full
    if "\n" in answer:
        return None
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _ask(rng: random.Random, kind: str, terse: bool, history: Messages) -> _Asked:
    """The last question: from the tasks that can show a `kind` content failure (any task for a form
    failure), with the tasks' usual weights, and sometimes with "answer in capital letters"."""
    fns = [t for t in CONTENT_TASKS.get(kind, [t for t, _ in TASKS]) if not (history and t is _listing)]
    weights = dict(TASKS)
    fn = rng.choices(fns, weights=[weights[t] for t in fns])[0]
    question, full, short = fn(rng)
    capitals = not history and len(full) <= CAPITALS_MAX_CHARS and fn is not _listing and rng.random() < 0.15
    return _Asked(fn, question, full, short, terse, capitals)


def _rejected(rng: random.Random, kind: str, asked: _Asked, chosen: str, prompt_text: str) -> str | None:
    """The rejected answer with a `kind` failure, or None when this question cannot show one."""
    terse, full, short = asked.terse, asked.full, asked.short
    if kind in CONTENT_TASKS:
        return asked.form(*_wrong_answer(asked.fn, rng, asked.question, full, short))
    if kind == "ignored_capitals":
        if asked.capitals:
            return short if terse else full
        if asked.fn is _upper:  # "Write apple in capital letters." answered in lower case
            return chosen.lower()
        return None
    if kind == "ignored_terse":
        return asked.form(full, full) if terse else None
    if kind == "truncated":
        # Cut off at a space, so even a list stops mid-item; "9 times 7 is 63." cut to "63" is no
        # truncation but the terse answer, so that cut is left out.
        cuts = [i for i, ch in enumerate(chosen) if ch == " " and chosen[:i].lower() != short.lower()]
        return chosen[: rng.choice(cuts)] if len(cuts) >= 2 else None
    if kind == "repeated_question":
        return prompt_text
    if kind == "garbled":
        return _garble(rng, chosen)
    raise ValueError(f"unknown failure kind {kind!r}")


def _pair(rng: random.Random, kind: str, system: str | None) -> tuple[Messages, str, str] | None:
    """(prompt turns after the system prompt, chosen, rejected) with a `kind` failure, or None when this
    draw cannot show one (the caller draws again)."""
    terse = system == TERSE
    if kind == "wrong_follow_up":
        return _follow_up_pair(rng, terse)
    history = _earlier_exchange(rng, kind, terse)
    if history is None:
        return None
    asked = _ask(rng, kind, terse, history)
    question = f"Answer in capital letters: {asked.question}" if asked.capitals else asked.question
    prompt = [*history, {"role": "user", "content": question}]
    chosen = asked.form(asked.full, asked.short)
    rejected = _rejected(rng, kind, asked, chosen, question)
    return (prompt, chosen, rejected) if rejected is not None and rejected != chosen else None


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

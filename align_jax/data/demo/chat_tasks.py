"""The demo's templated tasks and the SFT chats made of them: the small vocabulary and facts they draw
from, one generator per task kind, and `make_chat`, which turns draws into one- or two-turn chats.

Each task needs the prompt to be read (arithmetic, reversing and upper-casing words, counting letters,
the larger of two numbers, numbered lists from a small vocabulary, short facts), yet is regular enough
for a ~1-5M-parameter model to learn on a CPU in minutes. Every draw comes from the `random.Random` it is
given, in a fixed order, so the files written from them are reproducible byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Callable


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

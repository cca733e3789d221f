"""The words of PAS: the PAS model's system prompt, the teacher / judge / scorer / tagger prompts, and the
per-category few-shot examples of good complements.

A complement is a short instruction appended to a user prompt that says how to answer well (form,
completeness, what to check) without answering it, changing what it asks, piling on demands, or
switching language. The examples below are the house style; add categories by adding keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Kept short: the PAS model reads it before every prompt (the demo model has a 256-token context).
PAS_SYSTEM = "Write a short complement to the user's prompt: guidance that helps answer it well. Do not answer it."

# The report's kinds of invalid complement (the judge's reasons), plus the two this code adds.
CHANGES_INTENT = "changes the intent"
ANSWERS_PROMPT = "answers the prompt"
EXCESSIVE_DEMANDS = "adds excessive demands"
WRONG_LANGUAGE = "wrong language"
INVALID_KINDS = (CHANGES_INTENT, ANSWERS_PROMPT, EXCESSIVE_DEMANDS, WRONG_LANGUAGE)
EMPTY = "empty complement"
UNPARSABLE = "unparsable judge output"

DEMO_CATEGORIES = ("arithmetic", "comparison", "word", "list", "fact")
GENERAL_CATEGORIES = ("math", "code", "writing", "knowledge", "reasoning")
OTHER = "other"

# category -> (prompt, complement) examples. "other" is the fallback for categories without examples.
FEW_SHOT: dict[str, tuple[tuple[str, str], ...]] = {
    "arithmetic": (
        ("What is 41 plus 17?", "Give the final result as a number at the end."),
        ("What is 9 times 6?", "Work it out carefully and state the result in one short sentence."),
        ("What is 80 minus 25?", "Check the subtraction once and give the result as a number."),
    ),
    "comparison": (
        ("Which is larger, 12 or 57?", "Name the larger number in one short sentence."),
        ("Which is larger, 88 or 31?", "Compare the two numbers and state which one is larger."),
    ),
    "word": (
        ("Reverse the word honey.", "Spell the reversed word carefully, letter by letter."),
        ("How many letters are in tiger?", "Count each letter once and give the count as a number."),
        ("Write lemon in capital letters.", "Give only the word in capital letters."),
    ),
    "list": (
        ("List three fruits.", "Write a numbered list with one item per line."),
        ("List two animals.", "Give exactly the number of items asked for, as a numbered list."),
    ),
    "fact": (
        ("What color is the sky?", "Answer in one short, factual sentence."),
        ("How many days are in a week?", "State the fact plainly in one sentence."),
    ),
    "math": (
        (
            "A train covers 180 km in 2 hours. What is its average speed?",
            "Show the steps briefly and give the final answer with its unit.",
        ),
        ("Solve x^2 - 5x + 6 = 0.", "Show the working and list every solution at the end."),
    ),
    "code": (
        (
            "Write a Python function that checks whether a string is a palindrome.",
            "Include a short docstring and one example call; keep it in one function.",
        ),
        (
            "Why does my loop never stop?",
            "Ask for or assume the relevant code, explain the likely cause, then show the fix.",
        ),
    ),
    "writing": (
        ("Write a short poem about autumn.", "Keep a consistent rhythm and end with a memorable image."),
        (
            "Draft an email asking my manager for a day off.",
            "Keep it polite and brief, and state the date and the reason clearly.",
        ),
    ),
    "knowledge": (
        ("What causes the seasons on Earth?", "Explain the main cause first, then correct the common misconception."),
        ("Who wrote Pride and Prejudice?", "Answer directly and add one sentence of context."),
    ),
    "reasoning": (
        (
            "If all cats are animals and some animals are black, are some cats black?",
            "Reason step by step and state clearly whether the conclusion follows.",
        ),
        (
            "Three friends split a bill unevenly; how do I work out who owes what?",
            "Lay out the method step by step and finish with a worked example.",
        ),
    ),
    OTHER: (
        ("Tell me about your weekend plans.", "Keep the reply friendly and short."),
        ("Give me some tips for studying.", "Organise the tips as a short list, most useful first."),
    ),
}

# A few labelled prompts per demo category for a nearest-centroid tagger (see tags.CentroidTagger).
DEMO_TAG_EXAMPLES: dict[str, tuple[str, ...]] = {
    "arithmetic": ("What is 12 plus 30?", "What is 70 minus 9?", "What is 6 times 8?", "What is 55 plus 44?"),
    "comparison": ("Which is larger, 14 or 41?", "Which is larger, 90 or 9?", "Which is larger, 3 or 77?"),
    "word": (
        "Reverse the word paper.",
        "Write river in capital letters.",
        "How many letters are in whale?",
        "How many times does the letter e appear in queen?",
    ),
    "list": ("List two colors.", "List three tools.", "List four animals."),
    "fact": ("What color is grass?", "What animal says woof?", "How many months are in a year?", "What do bees make?"),
}

TEACHER_SYSTEM = (
    "You write complementary prompts. Given a user prompt (category: {category}), write one or two short "
    "sentences of guidance that help an assistant answer it well: the form of the answer, what to check, "
    "what to include. Never answer the prompt, never change what it asks, do not add demands it does not "
    "imply, and write in the same language as the prompt. Reply with the complement only."
)

JUDGE_SYSTEM = (
    "You check complementary prompts. A complement is guidance appended to a user prompt. It is invalid if it "
    "changes the intent (asks for something else), answers the prompt (states the answer or part of it), adds "
    "excessive demands (far more work or constraints than the prompt implies), or is in the wrong language. "
    "Reply with exactly VALID, or INVALID: <reason> where <reason> is one of: " + ", ".join(INVALID_KINDS) + "."
)

QUALITY_SYSTEM = (
    "You rate user prompts for an instruction-tuning set. A good prompt is clear, self-contained, answerable "
    "and useful; a bad one is garbled, empty, unsafe or depends on missing context. Reply with a single "
    "integer score from 1 (worst) to 10 (best)."
)

TAGGER_SYSTEM = "You sort user prompts into categories. Categories: {categories}. Reply with the category name only."


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def teacher_messages(
    prompt: str, category: str, examples: Mapping[str, Sequence[tuple[str, str]]], n_shot: int
) -> list[dict[str, str]]:
    """The teacher's chat: the system instruction, then up to `n_shot` (prompt, complement) examples of
    the prompt's category (of "other" when it has none) as earlier turns, then the prompt itself as
    the last user turn, unwrapped."""
    shots = list(examples.get(category) or examples.get(OTHER) or ())[: max(0, n_shot)]
    messages = [{"role": "system", "content": TEACHER_SYSTEM.format(category=category)}]
    for p, c in shots:
        messages += [_user(p), {"role": "assistant", "content": c}]
    return [*messages, _user(prompt)]


def judge_messages(prompt: str, complement: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        _user(f"Prompt:\n{prompt}\n\nComplement:\n{complement}"),
    ]


def quality_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": QUALITY_SYSTEM}, _user(f"Prompt:\n{prompt}\n\nScore (1-10):")]


def tagger_messages(prompt: str, categories: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": TAGGER_SYSTEM.format(categories=", ".join(categories))}, _user(prompt)]


def pas_messages(prompt: str, system: str = PAS_SYSTEM) -> list[dict[str, str]]:
    """What the PAS model sees, in training (sft_rows) and at inference (Augmenter)."""
    return [{"role": "system", "content": system}, _user(prompt)]

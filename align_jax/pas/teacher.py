"""`TemplateTeacher`: the offline demo's stand-in for a teacher LLM.

The tiny CPU demo has no model that can write complementary prompts, so this rule-based teacher writes
them from templates for the demo's task kinds (arithmetic, comparison, word tasks, lists, facts, and the
"Answer in capital letters:" constraint), which is enough to train a real (tiny) PAS model on real
(prompt -> complement) pairs. It is not a language model and has no place in a real run: there the
teacher is a ChatModel (or any object with the same `generate`).

It has the teacher's interface, `generate(prompts, *, max_new_tokens, temperature, seed) -> list[str]`,
where each prompt is the chat of `templates.teacher_messages` (or a plain string): it reads the user
prompt from the last user turn and the category from the system turn (or classifies the prompt itself).
Output is a deterministic function of (seed, prompt); temperature and max_new_tokens are ignored.

With probability `flaw_rate` (seeded per prompt and seed) it writes a flawed complement on purpose (one
that states the answer, or one with excessive demands), so the judge / regenerate loop has real work in
the demo; a retry uses a new seed and so usually comes back clean.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

from align_jax.pas import templates

_CAPS = re.compile(r"^\s*answer in capital letters:\s*", re.IGNORECASE)
_CATEGORY = re.compile(r"\(category: ([^)]+)\)")
_ARITH = re.compile(r"what is (\d+) (plus|minus|times) (\d+)", re.IGNORECASE)
_LARGER = re.compile(r"which is larger, (\d+) or (\d+)", re.IGNORECASE)
_REVERSE = re.compile(r"reverse the word (\w+)", re.IGNORECASE)
_UPPER = re.compile(r"write (\w+) in capital letters", re.IGNORECASE)
_LENGTH = re.compile(r"how many letters are in (\w+)", re.IGNORECASE)
_LETTER = re.compile(r"how many times does the letter (\w) appear in (\w+)", re.IGNORECASE)
_LIST = re.compile(r"^list (two|three|four|\d+) (\w+)", re.IGNORECASE)

GOOD: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "Give the final result as a number at the end.",
        "Work it out carefully and state the result in one short sentence.",
        "Check the calculation once before giving the result.",
    ),
    "comparison": (
        "Name the larger number in one short sentence.",
        "Compare the two numbers and state which one is larger.",
    ),
    "reverse": (
        "Spell the reversed word carefully, letter by letter.",
        "Write the letters in reverse order and check the result once.",
    ),
    "upper": ("Give only the word in capital letters.", "Write every letter as a capital."),
    "length": ("Count each letter once and give the count as a number.", "Count the letters carefully."),
    "letter": (
        "Check every letter of the word and give the count as a number.",
        "Count each matching letter once; zero is a possible count.",
    ),
    "list": (
        "Write a numbered list with one item per line.",
        "Give exactly the number of items asked for, as a numbered list.",
    ),
    "fact": ("Answer in one short, factual sentence.", "State the fact plainly in one sentence."),
}
KIND_CATEGORY = {
    "arithmetic": "arithmetic",
    "comparison": "comparison",
    "reverse": "word",
    "upper": "word",
    "length": "word",
    "letter": "word",
    "list": "list",
    "fact": "fact",
}
CAPS_NOTE = "Keep the whole answer in capital letters."
EXCESSIVE = (
    "Answer in at least 500 words, cite five sources, add a table, a summary and a translation into three languages.",
    "Write at least 300 words, include ten worked examples, a diagram, references and a short quiz at the end.",
)
LEAK = ("The answer is: {answer}.", "Note that the result is {answer}; give it clearly.")


def _facts() -> dict[str, str]:
    from align_jax.data.demo.make_demo_data import FACTS

    return {q.lower(): a for q, a in FACTS}


def demo_kind(prompt: str) -> tuple[str, str | None]:
    """(task kind, its short answer or None) of a demo prompt; kind "other" when it is none of them."""
    q = _CAPS.sub("", prompt).strip()
    if m := _ARITH.search(q):
        a, op, b = int(m.group(1)), m.group(2).lower(), int(m.group(3))
        return "arithmetic", str(a + b if op == "plus" else a - b if op == "minus" else a * b)
    if m := _LARGER.search(q):
        return "comparison", str(max(int(m.group(1)), int(m.group(2))))
    if m := _REVERSE.search(q):
        return "reverse", m.group(1)[::-1]
    if m := _UPPER.search(q):
        return "upper", m.group(1).upper()
    if m := _LETTER.search(q):
        return "letter", str(m.group(2).lower().count(m.group(1).lower()))
    if m := _LENGTH.search(q):
        return "length", str(len(m.group(1)))
    if _LIST.search(q):
        return "list", None
    fact = _facts().get(q.lower())
    if fact is not None:
        return "fact", fact
    return templates.OTHER, None


def demo_category(prompt: str) -> str:
    """The demo category (templates.DEMO_CATEGORIES) of a prompt by its template, else "other"."""
    return KIND_CATEGORY.get(demo_kind(prompt)[0], templates.OTHER)


class DemoRuleTagger:
    """Tags demo prompts by their template (exact, for the demo; see tags.py for general taggers)."""

    def tag(self, prompts: Sequence[str], embeddings: Any = None) -> list[str]:
        return [demo_category(p) for p in prompts]


def _last_user(prompt: Any) -> tuple[str, str | None]:
    if isinstance(prompt, str):
        return prompt, None
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    systems = [m["content"] for m in prompt if m.get("role") == "system"]
    category = None
    if systems and (m := _CATEGORY.search(systems[0])):
        category = m.group(1).strip()
    return (users[-1] if users else ""), category


class TemplateTeacher:
    """Rule-based teacher for the offline demo (a stand-in for a teacher LLM; see the module docstring)."""

    def __init__(self, *, flaw_rate: float = 0.15, examples: dict | None = None):
        if not 0.0 <= flaw_rate <= 1.0:
            raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
        self.flaw_rate = flaw_rate
        self.examples = templates.FEW_SHOT if examples is None else examples

    def complement(self, prompt: str, category: str | None = None, seed: int = 0) -> str:
        digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        kind, answer = demo_kind(prompt)
        if rng.random() < self.flaw_rate:
            if answer is not None and rng.random() < 0.5:
                if kind == "fact":  # a whole sentence: "The answer is: the sky is blue."
                    answer = answer[0].lower() + answer[1:].rstrip(".")
                return rng.choice(LEAK).format(answer=answer)
            return rng.choice(EXCESSIVE)
        if kind in GOOD:
            text = rng.choice(GOOD[kind])
        else:
            pool = self.examples.get(category or "") or self.examples.get(templates.OTHER) or (("", "Answer clearly."),)
            text = rng.choice(pool)[1]
        if _CAPS.match(prompt):
            text = f"{text} {CAPS_NOTE}"
        return text

    def generate(self, prompts: Sequence[Any], *, seed: int = 0, **unused: Any) -> list[str]:
        out = []
        for p in prompts:
            text, category = _last_user(p)
            out.append(self.complement(text, category, seed))
        return out

"""Judges of complementary prompts: `judge(items) -> list[Verdict]`, one verdict per item, where an item is
a mapping with "prompt" and "complement" (and optionally "category", and "answer": the prompt's short
reference answer when known).

Invalid reasons are the report's four kinds (templates.INVALID_KINDS: changes the intent, answers the
prompt, adds excessive demands, wrong language) plus "empty complement", and for the model judge
"unparsable judge output" when its reply says neither VALID nor INVALID.

`ModelJudge`: a chat model shown the criteria (templates.JUDGE_SYSTEM), greedy. Its reply is read as
VALID or INVALID: <reason>; a reason that mentions one kind's key word (intent / answer / excessive or
demand / language) becomes that kind, any other text is kept as written. Use it for real data.

`RuleJudge`: programmatic checks, in this order, the first failing one giving the reason:
1. empty: nothing but whitespace.
2. wrong language: the dominant Unicode script by words (Latin, Cyrillic, CJK incl. kana, Hangul,
   Arabic, ...) differs between prompt and complement. It cannot tell two Latin-script languages apart.
3. answers the prompt: the item's "answer" appears in the complement (whole word, case-insensitive) but
   not in the prompt; or the result of an arithmetic expression in the prompt ("a plus b", "a * b", ...)
   appears as a number in the complement but not in the prompt; or, for the demo's word tasks, the
   reversed / capitalised word appears; or the complement says "the answer is ..." / "result: ...".
4. adds excessive demands: more than `max_words` words or `max_sentences` sentences, a large quantity
   demand ("500 words", "at least 20 ...", but not a limit such as "at most 200 words"), or more than
   `max_demands` comma/and-separated clauses.
5. changes the intent: a redirect ("instead", "ignore the ...", "do not answer"), or the complement poses
   a new task (starts with a task verb such as write/explain/translate, or asks a question) whose
   content words mostly do not occur in the prompt (words of answer-format guidance do not count).
   A weak, surface check: good for the demo and as a cheap pre-filter, not a substitute for a model.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax.pas import templates
from align_jax.pas.templates import ANSWERS_PROMPT, CHANGES_INTENT, EMPTY, EXCESSIVE_DEMANDS, UNPARSABLE, WRONG_LANGUAGE


@dataclasses.dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str = ""  # "" when valid


VALID = Verdict(True)

_WORDS = re.compile(r"[^\W\d_]+", re.UNICODE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)")
_ARITH = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(plus|minus|times|multiplied by|divided by|over|\+|-|\*|x|×|/|÷)\s*(-?\d+(?:\.\d+)?)",
    re.IGNORECASE,
)
_REVERSE = re.compile(r"reverse the word (\w+)", re.IGNORECASE)
_UPPER = re.compile(r"write (\w+) in capital letters", re.IGNORECASE)
_ANSWER_MARKER = re.compile(
    r"\b(?:answer|result|solution)s?\s+(?:is|are|would be|will be|equals)\b|\b(?:answer|result|solution)\s*[:=]\s*\S",
    re.IGNORECASE,
)
_BIG_QUANTITY = re.compile(
    r"\b\d{3,}\s+(?:\w+\s+)?(?:words|sentences|lines|paragraphs|examples|items|pages|points|steps|sources)\b"
    r"|\bat least\s+(?:\d{2,}|ten|twenty|thirty|fifty|hundred)\b",
    re.IGNORECASE,
)
# "in 100 words or fewer" is a limit, not a demand.
_LIMIT_BEFORE = re.compile(
    r"(?:at most|no more than|fewer than|less than|under|within|up to|maximum of)\s*$", re.IGNORECASE
)
_LIMIT_AFTER = re.compile(r"^\s*(?:or (?:fewer|less)|at most|max(?:imum)?)\b", re.IGNORECASE)
_REDIRECT = re.compile(
    r"\binstead\b|\bignore (?:the|this|that|your|it)\b|\brather than (?:answer|respond)|\bdo not answer\b|\bdon't answer\b"
    r"|\bforget (?:the|this|that)\b|\b(?:a|another) different (?:question|task|topic)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?;。！？；]+")
_CLAUSE_SPLIT = re.compile(r",|;|\band\b|\balso\b|\bplus\b", re.IGNORECASE)


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


TASK_VERBS = _wordset(
    "write translate explain describe tell compose summarize summarise calculate compute draw create generate "
    "discuss solve discover research find"
)
STOPWORDS = _wordset(
    "a an the and or but if then so of to in on at by for with from as into about over under is are be was were "
    "it its this that these those your you my me i we our they their he she his her them what which who whom how "
    "why when where do does did not no yes can could should would will shall may might must than too very more "
    "most less least all any each every some such own same other just also only there here"
)
# Words of answer-format guidance: they say how to answer, not what about, so they never count as off-topic.
GUIDANCE = _wordset(
    "answer answers reply respond response result results final number numbers numeric format formatted step steps "
    "brief briefly short shortly clear clearly concise concisely plain plainly simple simply direct directly list "
    "numbered item items line lines one two three four per show showing working work out give keep state sentence "
    "sentences word words letter letters capital capitals count check careful carefully spell spelled reversed exact "
    "exactly asked include including end start begin first then finally main key point points example examples "
    "explain explanation reason reasoning method solution solutions unit units fact factual compare comparison larger "
    "smaller name whether conclusion follows context consistent polite friendly useful organise organize tips once "
    "correct common relevant likely cause fix assume code docstring function call lay worked memorable image rhythm "
    "summary detail details structure mention note use using make sure avoid without whole only total value "
    "calculation arithmetic check checking verify before after order"
)


def dominant_script(text: str) -> str | None:
    """The Unicode script ("LATIN", "CJK", "CYRILLIC", ...) with the most words in the text, None when it
    has no letters. A word is a run of letters of one script, except that every Han / kana character
    counts as one (they are written without spaces). Kana and Han count as one script ("CJK")."""
    counts: dict[str, int] = {}
    previous = None
    for ch in text:
        if not ch.isalpha():
            previous = None
            continue
        script = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
        if script in ("HIRAGANA", "KATAKANA", "CJK"):
            script = "CJK"
        if script == "CJK" or script != previous:
            counts[script] = counts.get(script, 0) + 1
        previous = script
    return max(counts, key=lambda s: counts[s]) if counts else None


def _numbers(text: str) -> set[float]:
    return {float(m) for m in _NUMBER.findall(text)}


def arithmetic_results(prompt: str) -> set[float]:
    """The values of the simple binary expressions written in the prompt (words or symbols)."""
    out = set()
    for a, op, b in _ARITH.findall(prompt):
        x, y, op = float(a), float(b), op.lower()
        if op in ("plus", "+"):
            out.add(x + y)
        elif op in ("minus", "-"):
            out.add(x - y)
        elif op in ("times", "multiplied by", "*", "x", "×"):
            out.add(x * y)
        elif y != 0:
            out.add(round(x / y, 6))
    return out


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


class RuleJudge:
    def __init__(self, *, max_words: int = 40, max_sentences: int = 3, max_demands: int = 5, min_foreign: int = 2):
        self.max_words, self.max_sentences = max_words, max_sentences
        self.max_demands, self.min_foreign = max_demands, min_foreign

    def judge(self, items: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        return [self.check(it["prompt"], it["complement"], it.get("answer")) for it in items]

    def check(self, prompt: str, complement: str, answer: Any = None) -> Verdict:
        if not complement.strip():
            return Verdict(False, EMPTY)
        ps, cs = dominant_script(prompt), dominant_script(complement)
        if ps and cs and ps != cs:
            return Verdict(False, WRONG_LANGUAGE)
        if self._answers(prompt, complement, answer):
            return Verdict(False, ANSWERS_PROMPT)
        if self._excessive(complement):
            return Verdict(False, EXCESSIVE_DEMANDS)
        if self._changes_intent(prompt, complement):
            return Verdict(False, CHANGES_INTENT)
        return VALID

    def _answers(self, prompt: str, complement: str, answer: Any) -> bool:
        if answer is not None and str(answer).strip():
            a = str(answer).strip()
            if _contains_phrase(complement, a) and not _contains_phrase(prompt, a):
                return True
        leaked = (arithmetic_results(prompt) & _numbers(complement)) - _numbers(prompt)
        if leaked:
            return True
        for w in _REVERSE.findall(prompt):
            if len(w) > 1 and w[::-1].lower() != w.lower() and _contains_phrase(complement, w[::-1]):
                return True
        for w in _UPPER.findall(prompt):
            if w.upper() != w and re.search(rf"(?<!\w){re.escape(w.upper())}(?!\w)", complement):
                return True
        return _ANSWER_MARKER.search(complement) is not None

    def _excessive(self, complement: str) -> bool:
        words = len(complement.split())
        sentences = [s for s in _SENTENCE_END.split(complement) if s.strip()]
        clauses = [c for c in _CLAUSE_SPLIT.split(complement) if _WORDS.search(c)]
        return (
            words > self.max_words
            or len(sentences) > self.max_sentences
            or len(clauses) > self.max_demands
            or any(
                not _LIMIT_BEFORE.search(complement[: m.start()]) and not _LIMIT_AFTER.match(complement[m.end() :])
                for m in _BIG_QUANTITY.finditer(complement)
            )
        )

    def _changes_intent(self, prompt: str, complement: str) -> bool:
        if _REDIRECT.search(complement):
            return True
        words = [w.lower() for w in _WORDS.findall(complement)]
        new_task = "?" in complement or (bool(words) and words[0] in TASK_VERBS)
        if not new_task:
            return False
        known = {_stem(w.lower()) for w in _WORDS.findall(prompt)}
        content = [w for w in words if len(w) > 2 and w not in STOPWORDS]
        foreign = [w for w in content if w not in GUIDANCE and _stem(w) not in known and _stem(w) not in GUIDANCE]
        return len(foreign) >= self.min_foreign and len(foreign) * 2 >= len(content)


def canonical_reason(text: str) -> str:
    """A judge's free-text reason mapped onto the report's kinds by key word; other text kept as is."""
    t = text.lower()
    for key, kind in (
        ("language", WRONG_LANGUAGE),
        ("intent", CHANGES_INTENT),
        ("excessive", EXCESSIVE_DEMANDS),
        ("demand", EXCESSIVE_DEMANDS),
        ("answer", ANSWERS_PROMPT),
    ):
        if key in t:
            return kind
    return text.strip() or "invalid (no reason given)"


def parse_verdict(reply: str) -> Verdict:
    """ "VALID" -> valid; "INVALID: <reason>" or "NOT VALID: <reason>" (anywhere, any case) -> invalid with the canonical reason;
    anything else -> invalid, "unparsable judge output"."""
    m = re.search(r"\b(?:invalid|not\s+valid)\b\W*(.*)", reply, flags=re.IGNORECASE | re.DOTALL)
    if m:
        return Verdict(False, canonical_reason(m.group(1).strip().splitlines()[0] if m.group(1).strip() else ""))
    if re.search(r"\bvalid\b", reply, flags=re.IGNORECASE):
        return VALID
    return Verdict(False, UNPARSABLE)


class ModelJudge:
    def __init__(self, model: Any, *, max_new_tokens: int = 24, batch: int = 256):
        self.model, self.max_new_tokens, self.batch = model, max_new_tokens, batch

    def judge(self, items: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        out: list[Verdict] = []
        for lo in range(0, len(items), self.batch):
            chats = [templates.judge_messages(it["prompt"], it["complement"]) for it in items[lo : lo + self.batch]]
            replies = self.model.generate(chats, max_new_tokens=self.max_new_tokens, temperature=0.0)
            out += [parse_verdict(r) for r in replies]
        return out

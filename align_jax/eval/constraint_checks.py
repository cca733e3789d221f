"""The verifiable instruction checks: pure functions `response -> bool`, registered by name in `CHECKS`.

A prompt-set row (constraints.py) names a check and gives its keyword arguments; `Check.params` says
which arguments each check takes and of what kind, so constraints.py can validate a row before anything
runs. Register a new check with the `check` decorator.

Text units, as the checks count them:
  word      a run of letters or digits, with inner apostrophes or hyphens ("don't", "well-known");
            "3 plus 4 is 7." has five words, "1. fox" two.
  sentence  a piece of text between terminal punctuation (. ! ?) followed by a space, and line breaks,
            that holds at least one letter ("1." alone, a list number, is no sentence).
  list item a line starting with "N." or "N)" (numbered) or with "-", "*" or "•" (bullets), then text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

# `language`: the share of a response's letters that must be in the asked-for script.
LANGUAGE_SHARE = 0.9


# Text units ------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S")
_BULLET = re.compile(r"^\s*[-*•]\s+\S")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    pieces = (p.strip() for p in _SENTENCE_END.split(text))
    return [p for p in pieces if any(ch.isalpha() for ch in p)]


# Scripts by Unicode block, for `language`. A letter outside every listed range counts as "other".
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "hebrew": ((0x590, 0x5FF),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x900, 0x97F),),
    "thai": ((0xE00, 0xE7F),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    # Han ideographs (with extension A and the compatibility block) plus Japanese kana.
    "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x31F0, 0x31FF)),
}
# Language codes accepted besides the script names; "en" is also held to mostly-ASCII letters.
LANGUAGES = {
    **dict.fromkeys(("en", "fr", "de", "es", "it", "pt", "nl"), "latin"),
    **dict.fromkeys(("ru", "uk"), "cyrillic"),
    **dict.fromkeys(("ar", "fa"), "arabic"),
    **dict.fromkeys(("zh", "ja"), "cjk"),
    **{"el": "greek", "he": "hebrew", "hi": "devanagari", "th": "thai", "ko": "hangul"},
}


def script_of(ch: str) -> str:
    code = ord(ch)
    for name, ranges in SCRIPTS.items():
        if any(lo <= code <= hi for lo, hi in ranges):
            return name
    return "other"


# The registry -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """A check and its keyword arguments: name -> kind, where kind is "int" (>= 0), "pos_int" (>= 1),
    "str" (non-empty), "str_list" (a non-empty list of non-empty strings) or "lang" (a key of LANGUAGES or
    SCRIPTS)."""

    name: str
    fn: Callable[..., bool]
    params: Mapping[str, str]
    doc: str


CHECKS: dict[str, Check] = {}


def check(name: str, **params: str) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        CHECKS[name] = Check(name, fn, params, (fn.__doc__ or "").strip())
        return fn

    return register


@check("max_words", n="int")
def max_words(response: str, n: int) -> bool:
    """At most n words."""
    return len(words(response)) <= n


@check("min_words", n="int")
def min_words(response: str, n: int) -> bool:
    """At least n words."""
    return len(words(response)) >= n


@check("max_sentences", n="pos_int")
def max_sentences(response: str, n: int) -> bool:
    """At most n sentences."""
    return len(sentences(response)) <= n


@check("all_capitals")
def all_capitals(response: str) -> bool:
    """No lower-case letter, and at least one upper-case one (a bare number is not "in capitals")."""
    return not any(ch.islower() for ch in response) and any(ch.isupper() for ch in response)


@check("all_lowercase")
def all_lowercase(response: str) -> bool:
    """No upper-case letter, and at least one lower-case one."""
    return not any(ch.isupper() for ch in response) and any(ch.islower() for ch in response)


def _phrase(keyword: str) -> re.Pattern[str]:
    # Whole words only ("cat" is not in "category"); a phrase matches across any run of spaces.
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


@check("include_keywords", keywords="str_list")
def include_keywords(response: str, keywords: Sequence[str]) -> bool:
    """Every keyword occurs as a whole word or phrase, ignoring case."""
    return all(_phrase(k).search(response) for k in keywords)


@check("exclude_keywords", keywords="str_list")
def exclude_keywords(response: str, keywords: Sequence[str]) -> bool:
    """No keyword occurs as a whole word or phrase, ignoring case."""
    return not any(_phrase(k).search(response) for k in keywords)


@check("numbered_list", n="pos_int")
def numbered_list(response: str, n: int) -> bool:
    """Exactly n numbered items, numbered 1..n in order (other lines, say an intro, are allowed)."""
    numbers = [int(m.group(1)) for line in response.splitlines() if (m := _NUMBERED.match(line))]
    return numbers == list(range(1, n + 1))


@check("bullet_list", n="pos_int")
def bullet_list(response: str, n: int) -> bool:
    """Exactly n bullet items ("-", "*" or "•" at a line's start)."""
    return sum(bool(_BULLET.match(line)) for line in response.splitlines()) == n


@check("starts_with", prefix="str")
def starts_with(response: str, prefix: str) -> bool:
    """Starts with the prefix, ignoring case and leading white space."""
    return response.lstrip().lower().startswith(prefix.lower())


@check("ends_with", suffix="str")
def ends_with(response: str, suffix: str) -> bool:
    """Ends with the suffix, ignoring case and trailing white space."""
    return response.rstrip().lower().endswith(suffix.lower())


@check("no_commas")
def no_commas(response: str) -> bool:
    """No comma (ASCII, full-width or the ideographic one)."""
    return not any(ch in response for ch in ",，、")


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n\s*```$", re.DOTALL)


@check("json_format")
def json_format(response: str) -> bool:
    """The whole response parses as JSON; one enclosing ``` fence (```json ...```) is allowed."""
    text = response.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


@check("language", lang="lang")
def language(response: str, lang: str) -> bool:
    """The letters are in the script of `lang` (a code in LANGUAGES or a script name in SCRIPTS).

    Heuristic: at least one letter, and at least LANGUAGE_SHARE (90%) of the letters (str.isalpha;
    digits, punctuation and emoji do not count) lie in that script's Unicode blocks. For "en", 90% of
    the letters must also be plain ASCII, so French or German text with many accents fails while an
    English text quoting "café" passes. Scripts are not languages: this tells English from Russian or
    Chinese, not English from Dutch."""
    script = LANGUAGES.get(lang, lang)
    letters = [ch for ch in unicodedata.normalize("NFC", response) if ch.isalpha()]
    if not letters:
        return False
    in_script = sum(script_of(ch) == script for ch in letters)
    if in_script < LANGUAGE_SHARE * len(letters):
        return False
    return lang != "en" or sum(ch.isascii() for ch in letters) >= LANGUAGE_SHARE * len(letters)

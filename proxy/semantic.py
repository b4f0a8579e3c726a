"""The semantic layer's pure half: what is compared, and the guards against false hits. Pure.

A request is a semantic candidate when its last message is plain user text (Chat Completions:
a `user` message whose content is a string or text parts; Responses: `input` as a string, or
a last input item that is a user message of text). Only that text is compared by meaning;
everything else in the body (system prompt, earlier turns, tools, temperature, model, ...)
must match exactly, so it goes into the *partition* the text is searched in.

Embeddings say "is X" and "is X not", or "17 and 25" and "17 and 26", are close. So a
candidate that clears the similarity threshold must also pass the guards:

- **numbers**: the multiset of numbers in both texts is the same (digits, with their
  separators and decimals, and number words: "seventeen" is 17, "a dozen" is 12);
- **negation**: both texts hold the same count of negations (not, no, never, n't, none,
  nothing, nobody, neither, nor, without, cannot, ...).

The guards are compared as keyed digests (`signature`), so an index never keeps the text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

TEXT_MAX = 8000
"""Longest compared text in characters (about the embedding models' input limit); a longer
last message is not a semantic candidate."""
MARK = "\x00semantic-text\x00"
"""Stands for the compared text inside the partition's canonical body."""

NEGATIONS = frozenset(
    {
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "nowhere",
        "neither",
        "nor",
        "without",
        "cannot",
        "cant",
        "dont",
        "doesnt",
        "didnt",
        "isnt",
        "arent",
        "wasnt",
        "werent",
        "wont",
        "wouldnt",
        "shouldnt",
        "couldnt",
        "hasnt",
        "havent",
        "hadnt",
        "mustnt",
        "neednt",
        "aint",
        "shant",
        "nope",
    }
)
UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "dozen": 12, "first": 1, "second": 2,
    "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9,
    "tenth": 10, "half": 0.5, "twice": 2, "thrice": 3, "once": 1, "double": 2, "triple": 3,
}  # fmt: skip
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_TOKEN = re.compile(r"\d[\d,_]*(?:\.\d+)?|[^\W\d_]+(?:['\u2019][^\W\d_]+)*")


_SCALE_VALUES = frozenset(float(v) for v in SCALES.values())


def _continues(previous: float, value: float) -> bool:
    """Does a number word go on the number before it ("twenty" "five", "hundred" "five")?"""
    if previous in _SCALE_VALUES:
        return True
    return previous % 10 == 0 and 20 <= previous <= 90 and value < 10


@dataclass(frozen=True, slots=True)
class Features:
    """What the guards compare: the sorted numbers and the count of negations."""

    numbers: tuple[str, ...]
    negations: int


def _number(token: str) -> str:
    """A digit token in one spelling: "1,000" and "1000" and "1000.0" are one number."""
    whole, _, frac = token.replace(",", "").replace("_", "").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def features(text: str) -> Features:
    """The numbers (digits and number words; a run of words like "twenty five" is one
    number, 25) and the negations in `text`."""
    numbers: list[str] = []
    negations = 0
    run: list[float] = []  # number words in a row: "two hundred and five"

    def flush() -> None:
        if run:
            total = current = 0.0
            for value in run:
                if value in _SCALE_VALUES:
                    current = (current or 1) * value
                    if value >= 1000:
                        total, current = total + current, 0.0
                else:
                    current += value
            value = total + current
            numbers.append(_number(f"{value:.6f}"))
            run.clear()

    for match in _TOKEN.finditer(text.lower()):
        token = match.group()
        if token[0].isdigit():
            flush()
            numbers.append(_number(token))
            continue
        word = token.replace("\u2019", "'")
        if word in UNITS:
            value = float(UNITS[word])
            if run and not _continues(run[-1], value):
                flush()
            run.append(value)
            continue
        if word in SCALES:
            run.append(float(SCALES[word]))
            continue
        if word == "and" and run and run[-1] in _SCALE_VALUES:
            continue  # "two hundred and five"
        flush()
        if word.replace("'", "") in NEGATIONS or word.endswith("n't"):
            negations += 1
    flush()
    return Features(tuple(sorted(numbers)), negations)


def guard(a: Features, b: Features) -> str | None:
    """Why two texts may not share an answer ("numbers", "negation"), or None."""
    if a.numbers != b.numbers:
        return "numbers"
    if a.negations != b.negations:
        return "negation"
    return None


SIG_BYTES = 16


def signature(key: bytes, f: Features) -> bytes:
    """The guards' features as two keyed 8-byte digests (numbers, negation): comparable,
    never the text. `key` is the proxy's MAC key."""
    nums = hashlib.blake2b(
        "\x00".join(f.numbers).encode(), key=key, digest_size=8, person=b"sem-num"
    ).digest()
    neg = hashlib.blake2b(str(f.negations).encode(), key=key, digest_size=8, person=b"sem-neg")
    return nums + neg.digest()


def signature_guard(a: bytes, b: bytes) -> str | None:
    """guard() over two signatures."""
    if a[:8] != b[:8]:
        return "numbers"
    if a[8:] != b[8:]:
        return "negation"
    return None


def _text_parts(content: Any, part_type: str) -> str | None:
    """The text of a content that is a string or a list of text parts only, else None."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return None
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or set(part) != {"type", "text"}:
            return None
        if part["type"] != part_type or not isinstance(part["text"], str):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


def query_of(twin: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(the compared text, the body with that text replaced by MARK) for a semantic
    candidate; None when the last message is not plain user text (tool results, images,
    audio, an assistant turn) or the text is empty or longer than TEXT_MAX."""
    text: str | None = None
    rest: dict[str, Any] = {}
    if twin == "chat":
        messages = fields.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = _text_parts(last.get("content"), "text")
        rest = {**fields, "messages": [*messages[:-1], {**last, "content": MARK}]}
    elif twin == "responses":
        given = fields.get("input")
        if isinstance(given, str):
            text, rest = given, {**fields, "input": MARK}
        elif isinstance(given, list) and given:
            last = given[-1]
            if (
                not isinstance(last, dict)
                or last.get("role") != "user"
                or last.get("type", "message") != "message"
            ):
                return None
            text = _text_parts(last.get("content"), "input_text")
            rest = {**fields, "input": [*given[:-1], {**last, "content": MARK}]}
    if text is None or not text.strip() or len(text) > TEXT_MAX:
        return None
    return text, rest


def text_of(twin: str, body: bytes) -> str:
    """The compared text of a body make_plan found to be a semantic candidate."""
    fields = orjson.loads(body)
    found = query_of(twin, fields) if isinstance(fields, dict) else None
    return found[0] if found is not None else ""

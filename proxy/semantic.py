"""The semantic layer's pure half: what is compared, and the guards against false hits. Pure.

A request is a semantic candidate when its last message is plain user text (Chat Completions:
a `user` message whose content is a string or text parts; Responses: `input` as a string, or
a last input item that is a user message of text). Only that text is compared by meaning;
everything else in the body (system prompt, earlier turns, tools, temperature, model, ...)
must match exactly, so it goes into the *partition* the text is searched in.

Embeddings say "is X" and "is X not", or "17 and 25" and "17 and 26", are close. So a
candidate that clears the similarity threshold must also pass the guards (guards.py:
numbers, negation, affixes, antonyms, direction, entities and their order, scope,
language), compared as keyed digests, so an index never keeps the text.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.twins import chat_to_json, responses_to_json

TEXT_MAX = 8000
"""Longest compared text in characters (about the embedding models' input limit); a longer
last message is not a semantic candidate."""
MARK = "\x00semantic-text\x00"
"""Stands for the compared text inside the partition's canonical body."""


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


JUDGE_SYSTEM = (
    "You check a cache of answers. A new request arrived and a cached answer was found for a "
    "request worded differently. Reply with one word: yes if the cached answer is a correct "
    "and complete answer to the new request, otherwise no."
)
ANSWER_MAX = 8000
"""Longest cached answer shown to the judge, in characters (a longer one is cut)."""


def answer_text(twin: str, body: bytes, stream: bool) -> str | None:
    """The text of a stored chat or Responses answer (JSON or a recorded stream), or None."""
    try:
        if stream:
            body = chat_to_json(body) if twin == "chat" else responses_to_json(body)
        doc = orjson.loads(body)
        if twin == "chat":
            content = doc["choices"][0]["message"]["content"]
            return content[:ANSWER_MAX] if isinstance(content, str) else None
        texts = [
            part["text"]
            for item in doc.get("output", [])
            if isinstance(item, dict) and item.get("type") == "message"
            for part in item.get("content", [])
            if isinstance(part, dict) and part.get("type") == "output_text"
        ]
        return "".join(texts)[:ANSWER_MAX] if texts else None
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def judge_body(model: str, question: str, answer: str) -> bytes:
    """The judge's Chat Completions request: one word, deterministic."""
    user = f"New request:\n{question}\n\nCached answer:\n{answer}\n\nyes or no?"
    return orjson.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
            "max_tokens": 2,
        }
    )


def judge_says(body: bytes) -> bool | None:
    """The judge's verdict: True for yes, False for no, None when unreadable."""
    try:
        content = orjson.loads(body)["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str):
        return None
    word = content.strip().strip(".!\"'").lower()
    return True if word == "yes" else False if word == "no" else None

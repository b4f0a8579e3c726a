"""Server-sent events: is a recorded stream whole and clean? Pure.

A stream is stored only if it ended the way its API ends a good answer: `data: [DONE]` (Chat
Completions, Completions), `response.completed` / `response.incomplete` (Responses),
`image_generation.completed` / `image_edit.completed` (streamed images), `speech.audio.done`,
`transcript.text.done`. Any `error` event, or `response.failed`, spoils it.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

TERMINAL_TYPES = frozenset(
    {
        "response.completed",
        "response.incomplete",
        "image_generation.completed",
        "image_edit.completed",
        "speech.audio.done",
        "transcript.text.done",
    }
)
FAILED_TYPES = frozenset({"error", "response.failed"})


def events(body: bytes) -> Iterator[tuple[str, bytes]]:
    """(event name, data) for each event in an SSE body; comments and blanks are skipped."""
    text = body.replace(b"\r\n", b"\n")
    for block in text.split(b"\n\n"):
        name = ""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
        if data or name:
            yield name, b"\n".join(data)


def _type_of(data: bytes) -> tuple[str, bool]:
    """The payload's `type` field and whether it carries a top-level `error`."""
    if not data.startswith(b"{"):
        return "", False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", False
    if not isinstance(obj, dict):
        return "", False
    kind = obj.get("type")
    return (kind if isinstance(kind, str) else ""), obj.get("error") is not None


def verdict(body: bytes) -> str:
    """ "" if the stream is complete and clean, else why it must not be stored."""
    last = ""
    for name, data in events(body):
        if data == b"[DONE]":
            last = "[DONE]"
            continue
        kind, has_error = ("", False)
        if b'"error"' in data or b'"type"' in data:
            kind, has_error = _type_of(data)
        kind = name or kind
        if kind in FAILED_TYPES:
            return f"stream ended with {kind}"
        if has_error and kind not in TERMINAL_TYPES and not kind.startswith("response."):
            return "stream carried an error event"
        last = kind or "data"
    if last == "[DONE]" or last in TERMINAL_TYPES:
        return ""
    return "stream ended without its terminal event"


def usage_of_stream(body: bytes) -> dict[str, object] | None:
    """The usage totals a stream reports (chat usage chunk, or response.completed's usage)."""
    found: dict[str, object] | None = None
    for _name, data in events(body):
        if b'"usage"' not in data:
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        usage = obj.get("usage")
        if usage is None and isinstance(obj.get("response"), dict):
            usage = obj["response"].get("usage")
        if isinstance(usage, dict):
            found = usage
    return found

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


class Scanner:
    """The stream checks, fed chunk by chunk as the stream arrives: framing, the terminal
    event, error events and usage, each event looked at once. Nothing is ever a pass over a
    whole recorded stream on the loop (a 500k-event stream costs its events, spread out)."""

    def __init__(self) -> None:
        self._rest = bytearray()
        self.last = ""
        self.failure = ""
        self.usage: dict[str, object] | None = None

    def feed(self, chunk: bytes) -> None:
        self._rest += chunk
        if b"\n\n" not in chunk and b"\n" not in chunk[:1] and b"\r" not in chunk:
            return  # no event can have ended in this chunk
        data = bytes(self._rest)
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            return
        self._rest = bytearray(data[cut + 2 :])
        for name, payload in events(data[: cut + 2]):
            self._event(name, payload)

    def close(self) -> None:
        """The stream ended: an event without its closing blank line still counts."""
        rest = bytes(self._rest).replace(b"\r\n", b"\n")
        if rest.strip():
            for name, payload in events(rest):
                self._event(name, payload)
        self._rest = bytearray()

    def _event(self, name: str, data: bytes) -> None:
        if data == b"[DONE]":
            self.last = "[DONE]"
            return
        kind, has_error = ("", False)
        if b'"error"' in data or b'"type"' in data:
            kind, has_error = _type_of(data)
        kind = name or kind
        if not self.failure:
            if kind in FAILED_TYPES:
                self.failure = f"stream ended with {kind}"
            elif has_error and kind not in TERMINAL_TYPES and not kind.startswith("response."):
                self.failure = "stream carried an error event"
        self.last = kind or "data"
        if b'"usage"' in data:
            usage = _usage_of(data)
            if usage is not None:
                self.usage = usage

    def verdict(self) -> str:
        """ "" if the stream is complete and clean, else why it must not be stored."""
        if self.failure:
            return self.failure
        if self.last == "[DONE]" or self.last in TERMINAL_TYPES:
            return ""
        return "stream ended without its terminal event"


def verdict(body: bytes) -> str:
    """ "" if the whole stream `body` is complete and clean, else why it must not be stored."""
    scan = Scanner()
    scan.feed(body)
    scan.close()
    return scan.verdict()


def _usage_of(data: bytes) -> dict[str, object] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    return usage if isinstance(usage, dict) else None


def usage_of_stream(body: bytes) -> dict[str, object] | None:
    """The usage totals a whole stream reports (chat usage chunk, or response.completed's)."""
    scan = Scanner()
    scan.feed(body)
    scan.close()
    return scan.usage

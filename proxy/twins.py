"""Streamed / non-streamed twins: one stored answer serves both forms. Pure.

Requests to Chat Completions and the Responses API that differ only in `stream` and
`stream_options` share one key. The stored form (JSON or SSE) is converted for a client that
asked for the other one, keeping every field, as the SDKs' own stream accumulators
(openai-python's ChatCompletionStreamState and ResponseStreamState) read them:

- stored JSON -> SSE: Chat Completions as the API streams it (a first delta per choice with
  the role and every field not streamed in pieces: function_call, audio, annotations, ...;
  then content with its logprobs, refusal, each tool call, the finish_reason chunk, a usage
  chunk when `stream_options.include_usage` asks for it, `[DONE]`); Responses as the event
  sequence from `response.created` to `response.completed` carrying the stored response;
- stored SSE -> JSON: Chat Completions merged delta by delta as the SDKs merge them
  (accumulate_delta); Responses from the terminal event's response (its output from the
  output_item.done events when it carries none).

A chat stream stored without its usage chunk serves only streams without one (the handler
fetches the other forms: their usage is unknown). Images, audio and legacy Completions keep
one key per form (their streams are not a re-rendering of one object).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import NotConvertible
from proxy.sse import events

CHAT_ROUTES = ("/chat/completions",)
RESPONSES_ROUTES = ("/responses",)


def kind_of(route: str) -> str | None:
    """ "chat" or "responses" for routes whose two forms are one answer, else None."""
    if route.endswith(CHAT_ROUTES):
        return "chat"
    if route.endswith(RESPONSES_ROUTES):
        return "responses"
    return None


def _sse(data: bytes, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data + b"\n\n"


# -- Chat Completions ------------------------------------------------------------------------
CHAT_MESSAGE_DELTAS = ("role", "content", "refusal", "tool_calls")
"""Message fields streamed in their own deltas; every other field (function_call, audio,
annotations, and any the API adds later) goes whole in the choice's first delta."""
CHOICE_FIELDS = ("index", "message", "logprobs", "finish_reason")


def chat_to_sse(body: bytes, include_usage: bool) -> bytes:
    """A chat.completion object -> the chat.completion.chunk stream the API would send, which
    the SDKs' accumulators (openai-python's ChatCompletionStreamState, accumulate_delta) add
    back up to the same object: every field of the object, its choices and messages is sent."""
    doc = _object(body, "chat.completion")
    _check_chat(doc)
    base: dict[str, Any] = {
        "id": doc.get("id"),
        "object": "chat.completion.chunk",
        "created": doc.get("created"),
        "model": doc.get("model"),
    }
    for name, value in doc.items():
        if name not in base and name not in ("choices", "usage"):
            base[name] = value
    stream = _ChunkStream(base, include_usage)
    choices = doc.get("choices") or []
    for choice in sorted(choices, key=lambda c: c.get("index", 0)):
        _stream_choice(stream, choice)
    if include_usage:
        stream.chunk([], doc.get("usage"), last=True)
    stream.out.append(b"data: [DONE]\n\n")
    return b"".join(stream.out)


class _ChunkStream:
    """The chat.completion.chunk events written so far, each carrying the object's fields."""

    __slots__ = ("base", "include_usage", "out")

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        self.base = base
        self.include_usage = include_usage
        self.out: list[bytes] = []

    def chunk(self, choices: list[dict[str, Any]], usage: Any = None, last: bool = False) -> None:
        """One chunk with these choices (and `usage`, null but on the last chunk, if asked)."""
        obj = {**self.base, "choices": choices}
        if self.include_usage:
            obj["usage"] = usage if last else None
        self.out.append(_sse(orjson.dumps(obj)))

    def piece(self, i: int, delta: dict[str, Any], logprobs: Any = None) -> None:
        """One chunk with one delta for choice `i`."""
        self.chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None}])


def _stream_choice(stream: _ChunkStream, choice: dict[str, Any]) -> None:
    """One choice's chunks: the opening delta, its content with the logprobs, its refusal,
    each tool call, then the finish_reason."""
    i = choice.get("index", 0)
    msg = choice.get("message") or {}
    content = msg.get("content")
    stream.chunk([_opening(i, choice, msg)])
    logprobs = choice.get("logprobs")
    if isinstance(content, str) and content:
        stream.piece(i, {"content": content}, logprobs)
    elif logprobs is not None:
        stream.piece(i, {}, logprobs)
    refusal = msg.get("refusal")
    if isinstance(refusal, str) and refusal:
        stream.piece(i, {"refusal": refusal})
    for n, call in enumerate(msg.get("tool_calls") or []):
        stream.piece(i, {"tool_calls": [{"index": n, **call}]})
    stream.chunk(
        [{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}]
    )


def _opening(i: int, choice: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    """A choice's first delta: the role, empty content and refusal, and every message and
    choice field not streamed in pieces, whole."""
    content = msg.get("content")
    first: dict[str, Any] = {
        "role": msg.get("role", "assistant"),
        "content": "" if isinstance(content, str) else content,
    }
    if "refusal" in msg:
        refusal = msg["refusal"]
        first["refusal"] = "" if refusal == "" or not isinstance(refusal, str) else None
        if not isinstance(refusal, str):
            first["refusal"] = refusal
    for name, value in msg.items():
        if name not in CHAT_MESSAGE_DELTAS:
            first[name] = value
    opening = {"index": i, "delta": first, "logprobs": None, "finish_reason": None}
    for name, value in choice.items():
        if name not in CHOICE_FIELDS:
            opening[name] = value
    return opening


def chat_to_json(body: bytes) -> bytes:
    """A chat.completion.chunk stream -> the chat.completion object it adds up to, as the
    SDKs add it up (openai-python's ChatCompletionStreamState): every delta field merged
    (strings joined, indexed lists such as tool_calls merged by index), logprobs joined,
    the last finish_reason, and `usage` / `system_fingerprint` of the last chunk."""
    doc: dict[str, Any] | None = None
    choices: dict[int, dict[str, Any]] = {}
    for _name, data in events(body):
        if data == b"[DONE]" or not data.startswith(b"{"):
            continue
        obj = orjson.loads(data)
        if not isinstance(obj, dict) or obj.get("object") != "chat.completion.chunk":
            continue  # (Azure's content filter events; the SDKs skip them too)
        if doc is None:
            doc = {"system_fingerprint": None, **obj, "object": "chat.completion"}
            doc.pop("obfuscation", None)
        else:
            doc["usage"] = obj.get("usage")
            doc["system_fingerprint"] = obj.get("system_fingerprint")
        for ch in obj.get("choices") or []:
            i = ch["index"]
            if not isinstance(i, int):
                raise NotConvertible("a choice index is not an integer")
            delta = ch.get("delta") or {}
            snap = choices.get(i)
            if snap is None:
                snap = {k: v for k, v in ch.items() if k != "delta"}
                snap["message"] = accumulate_delta({}, delta)
                choices[i] = snap
            else:
                snap["message"] = accumulate_delta(snap["message"], delta)
                lp = ch.get("logprobs")
                if lp is not None:
                    held = snap.get("logprobs")
                    if held is None:
                        snap["logprobs"] = {
                            "content": lp.get("content"),
                            "refusal": lp.get("refusal"),
                        }
                    else:
                        for part in ("content", "refusal"):
                            if lp.get(part):
                                held[part] = (held.get(part) or []) + lp[part]
            if ch.get("finish_reason"):
                snap["finish_reason"] = ch["finish_reason"]
    if doc is None:
        raise NotConvertible("no chat.completion.chunk in the stored stream")
    for snap in choices.values():
        for call in snap["message"].get("tool_calls") or []:
            if isinstance(call, dict):
                call.pop("index", None)  # a stream's merge key, not a field of the object
    doc["choices"] = [choices[i] for i in sorted(choices)]
    _check_chat(doc)
    return orjson.dumps(doc)


def _check_chat(doc: dict[str, Any]) -> None:
    """NotConvertible unless the fields every client reads have the API's types (a damaged
    entry is fetched again, never passed on in the other form)."""
    choices = doc.get("choices")
    if not isinstance(choices, list):
        raise NotConvertible("choices is not a list")
    for choice in choices:
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            raise NotConvertible("a choice has no message object")
        for name in ("content", "refusal", "role"):
            if not isinstance(msg.get(name), str | None):
                raise NotConvertible(f"message.{name} is not a string")
        calls = msg.get("tool_calls")
        if calls is not None and not (
            isinstance(calls, list)
            and all(isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls)
        ):
            raise NotConvertible("message.tool_calls is not a list of calls")
        logprobs = choice.get("logprobs")
        if logprobs is not None and not (
            isinstance(logprobs, dict)
            and all(isinstance(logprobs.get(k), list | None) for k in ("content", "refusal"))
        ):
            raise NotConvertible("logprobs is not an object of lists")
        if not isinstance(choice.get("finish_reason"), str | None):
            raise NotConvertible("finish_reason is not a string")


def accumulate_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Merge one streamed delta into what came before, as the SDKs do (openai-python's
    lib/streaming/_deltas.accumulate_delta): strings and numbers add up, objects merge,
    lists of objects with an `index` merge by it, other lists extend; `index` and `type`
    are replaced."""
    for key, value in delta.items():
        if key not in acc or acc[key] is None:
            if _indexed(value):
                acc[key] = []
            else:
                acc[key] = value
                continue
        held = acc[key]
        if key in ("index", "type"):
            acc[key] = value
            continue
        if isinstance(held, str) and isinstance(value, str):
            held = f"{held}{value}"
        elif isinstance(held, int | float) and isinstance(value, int | float):
            held = held + value
        elif isinstance(held, dict) and isinstance(value, dict):
            held = accumulate_delta(held, value)
        elif isinstance(held, list) and isinstance(value, list):
            if all(isinstance(x, str | int | float) for x in held) and (
                held or not _indexed(value)
            ):
                held.extend(value)
                continue
            for entry in value:
                if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
                    raise NotConvertible("a list delta entry has no integer index")
                n = entry["index"]
                if n < len(held):
                    if not isinstance(held[n], dict):
                        raise NotConvertible("a list delta entry is not an object")
                    held[n] = accumulate_delta(held[n], entry)
                else:
                    held.insert(n, entry)
        acc[key] = held
    return acc


def _indexed(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(x, dict) and "index" in x for x in value)


def chat_stream_has_usage(body: bytes) -> bool:
    return b'"usage":{' in body or b'"usage": {' in body


# -- Responses API ------------------------------------------------------------------------------
def responses_to_json(body: bytes) -> bytes:
    """A Responses event stream -> the response object of its terminal event, as the SDKs
    take it (openai-python's ResponseStreamState): when that response carries no `output`,
    its output is the items of the output_item.done events (and, for an incomplete one, the
    items added but never done), in output_index order."""
    added: dict[int, Any] = {}
    done: dict[int, Any] = {}
    terminal: dict[str, Any] | None = None
    for name, data in events(body):
        if not data.startswith(b"{"):
            continue
        obj = orjson.loads(data)
        if not isinstance(obj, dict):
            continue
        kind = name or obj.get("type", "")
        if kind == "response.output_item.added" and obj.get("item") is not None:
            added[obj["output_index"]] = obj["item"]
        elif kind == "response.output_item.done":
            done[obj["output_index"]] = obj["item"]
        elif kind in ("response.completed", "response.incomplete") and isinstance(
            obj.get("response"), dict
        ):
            terminal = dict(obj["response"])
            if terminal.get("output") is None:
                items = done if kind == "response.completed" else {**added, **done}
                terminal["output"] = [items[i] for i in sorted(items)]
    if terminal is None:
        raise NotConvertible("no terminal response event in the stored stream")
    return orjson.dumps(terminal)


def responses_to_sse(body: bytes) -> bytes:
    """A response object -> the event sequence the API streams, from response.created to
    response.completed (or response.incomplete) carrying the stored response."""
    doc = _object(body, "response")
    events = _EventStream()
    start = {**doc, "status": "in_progress", "output": [], "usage": None}
    events.emit("response.created", response=start)
    events.emit("response.in_progress", response=start)
    for n, item in enumerate(doc.get("output") or []):
        kind = item.get("type")
        if kind == "message":
            _stream_message(events, n, item)
        elif kind == "function_call":
            _stream_function_call(events, n, item)
        else:
            events.emit("response.output_item.added", output_index=n, item=item)
        events.emit("response.output_item.done", output_index=n, item=item)
    terminal = "response.incomplete" if doc.get("status") == "incomplete" else "response.completed"
    events.emit(terminal, response=doc)
    return b"".join(events.out)


class _EventStream:
    """The Responses API events written so far, numbered in order."""

    __slots__ = ("out", "seq")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.seq = 0

    def emit(self, kind: str, **fields: Any) -> None:
        """One event of type `kind` with the next sequence number and these fields."""
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.out.append(_sse(orjson.dumps(obj), kind))
        self.seq += 1


def _stream_message(events: _EventStream, n: int, item: dict[str, Any]) -> None:
    """A message item's events but its last: added (no content yet), then each part."""
    events.emit(
        "response.output_item.added",
        output_index=n,
        item={**item, "status": "in_progress", "content": []},
    )
    for c, part in enumerate(item.get("content") or []):
        where = {"item_id": item.get("id"), "output_index": n, "content_index": c}
        empty = {**part, "text": ""} if "text" in part else {**part}
        if part.get("type") == "output_text":
            empty["annotations"] = []
            if "logprobs" in part:
                empty["logprobs"] = []
        events.emit("response.content_part.added", **where, part=empty)
        _stream_part_text(events, where, part)
        events.emit("response.content_part.done", **where, part=part)


def _stream_part_text(events: _EventStream, where: dict[str, Any], part: dict[str, Any]) -> None:
    """A content part's text or refusal, as one delta and its done event."""
    kind = part.get("type")
    if kind == "output_text":
        text = part.get("text", "")
        events.emit(
            "response.output_text.delta", **where, delta=text, logprobs=part.get("logprobs") or []
        )
        events.emit(
            "response.output_text.done", **where, text=text, logprobs=part.get("logprobs") or []
        )
    elif kind == "refusal":
        refusal = part.get("refusal", "")
        events.emit("response.refusal.delta", **where, delta=refusal)
        events.emit("response.refusal.done", **where, refusal=refusal)


def _stream_function_call(events: _EventStream, n: int, item: dict[str, Any]) -> None:
    """A function call item's events but its last: added (no arguments yet), the arguments
    as one delta, done."""
    events.emit(
        "response.output_item.added",
        output_index=n,
        item={**item, "status": "in_progress", "arguments": ""},
    )
    item_id = item.get("id")
    arguments = item.get("arguments", "")
    events.emit(
        "response.function_call_arguments.delta", item_id=item_id, output_index=n, delta=arguments
    )
    events.emit(
        "response.function_call_arguments.done",
        item_id=item_id,
        output_index=n,
        arguments=arguments,
    )


def _object(body: bytes, kind: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotConvertible("the stored answer is not JSON") from None
    if not isinstance(doc, dict) or doc.get("object") != kind:
        raise NotConvertible(f"the stored answer is not a {kind}")
    return doc


def convert(kind: str, body: bytes, *, to_stream: bool, include_usage: bool) -> bytes:
    """The other form of a stored answer of `kind` ("chat" or "responses")."""
    try:
        if kind == "chat":
            return chat_to_sse(body, include_usage) if to_stream else chat_to_json(body)
        return responses_to_sse(body) if to_stream else responses_to_json(body)
    except NotConvertible:
        raise
    except Exception as exc:  # whatever a damaged entry makes the conversion raise
        raise NotConvertible(f"the stored answer could not be converted: {exc}") from None

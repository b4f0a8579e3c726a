"""Streamed / non-streamed twins: one stored answer serves both forms. Pure.

Requests to Chat Completions and the Responses API that differ only in `stream` and
`stream_options` share one key. The stored form (JSON or SSE) is converted for a client that
asked for the other one:

- stored JSON -> SSE: Chat Completions as the API streams it (a role chunk, content,
  refusal, tool_calls and logprobs deltas, the finish_reason chunk, a usage chunk when
  `stream_options.include_usage` asks for it, `[DONE]`); Responses as the event sequence from
  `response.created` to `response.completed` carrying the stored response;
- stored SSE -> JSON: Chat Completions assembled from the deltas (content, tool calls,
  refusal, logprobs, finish reason, usage when the stream had it); Responses from the
  terminal event's response.

Images, audio and legacy Completions keep one key per form (their streams are not a
re-rendering of one object).
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
def chat_to_sse(body: bytes, include_usage: bool) -> bytes:
    """A chat.completion object -> the chat.completion.chunk stream the API would send."""
    doc = _object(body, "chat.completion")
    base = {
        "id": doc.get("id"),
        "object": "chat.completion.chunk",
        "created": doc.get("created"),
        "model": doc.get("model"),
    }
    for field in ("service_tier", "system_fingerprint"):
        if field in doc:
            base[field] = doc[field]
    out = []

    def chunk(choices: list[dict[str, Any]], usage: Any = None, last: bool = False) -> None:
        obj = {**base, "choices": choices}
        if include_usage:
            obj["usage"] = usage if last else None
        out.append(_sse(orjson.dumps(obj)))

    for choice in doc.get("choices") or []:
        i = choice.get("index", 0)
        msg = choice.get("message") or {}
        content = msg.get("content")
        first: dict[str, Any] = {
            "role": msg.get("role", "assistant"),
            "content": "" if content is not None else None,
        }
        if msg.get("refusal") is not None or "refusal" in msg:
            first["refusal"] = None
        chunk([{"index": i, "delta": first, "logprobs": None, "finish_reason": None}])
        logprobs = choice.get("logprobs")
        if content:
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"content": content},
                        "logprobs": logprobs,
                        "finish_reason": None,
                    }
                ]
            )
        elif logprobs:
            chunk([{"index": i, "delta": {}, "logprobs": logprobs, "finish_reason": None}])
        if msg.get("refusal"):
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"refusal": msg["refusal"]},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        for n, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function") or {}
            delta = {
                "tool_calls": [
                    {
                        "index": n,
                        "id": call.get("id"),
                        "type": call.get("type", "function"),
                        "function": {"name": fn.get("name"), "arguments": fn.get("arguments", "")},
                    }
                ]
            }
            chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
        chunk(
            [
                {
                    "index": i,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": choice.get("finish_reason"),
                }
            ]
        )
    if include_usage:
        chunk([], doc.get("usage"), last=True)
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def chat_to_json(body: bytes) -> bytes:
    """A chat.completion.chunk stream -> the chat.completion object it adds up to."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for _name, data in events(body):
        if data == b"[DONE]" or not data.startswith(b"{"):
            continue
        obj = orjson.loads(data)
        if not head:
            head = {k: obj[k] for k in ("id", "created", "model") if k in obj}
            for field in ("service_tier", "system_fingerprint"):
                if field in obj:
                    head[field] = obj[field]
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            c = choices.setdefault(
                ch.get("index", 0),
                {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "calls": {},
                    "logprobs": None,
                    "finish_reason": None,
                    "has_refusal": False,
                },
            )
            delta = ch.get("delta") or {}
            if delta.get("role"):
                c["role"] = delta["role"]
            if delta.get("content") is not None:
                c["content"] = (c["content"] or "") + delta["content"]
            if "refusal" in delta:
                c["has_refusal"] = True
            if delta.get("refusal") is not None:
                c["refusal"] = (c["refusal"] or "") + delta["refusal"]
            for call in delta.get("tool_calls") or []:
                slot = c["calls"].setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "name": "", "args": ""}
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                if call.get("type"):
                    slot["type"] = call["type"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["args"] += fn["arguments"]
            lp = ch.get("logprobs")
            if lp:
                merged = c["logprobs"] or {"content": None, "refusal": None}
                for part in ("content", "refusal"):
                    if lp.get(part):
                        merged[part] = (merged[part] or []) + lp[part]
                c["logprobs"] = merged
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]
    if not head:
        raise NotConvertible("no chat.completion.chunk in the stored stream")
    out_choices = []
    for i in sorted(choices):
        c = choices[i]
        message: dict[str, Any] = {"role": c["role"], "content": c["content"]}
        if c["has_refusal"] or c["refusal"] is not None:
            message["refusal"] = c["refusal"]
        if c["calls"]:
            message["tool_calls"] = [
                {
                    "id": s["id"],
                    "type": s["type"],
                    "function": {"name": s["name"], "arguments": s["args"]},
                }
                for _, s in sorted(c["calls"].items())
            ]
        out_choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
        )
    doc = {**head, "object": "chat.completion", "choices": out_choices}
    if usage is not None:
        doc["usage"] = usage
    return orjson.dumps(doc)


def chat_stream_has_usage(body: bytes) -> bool:
    return b'"usage":{' in body or b'"usage": {' in body


# -- Responses API ------------------------------------------------------------------------------
def responses_to_json(body: bytes) -> bytes:
    """A Responses event stream -> the response object of its terminal event."""
    for name, data in reversed(list(events(body))):
        if not data.startswith(b"{"):
            continue
        obj = orjson.loads(data)
        kind = name or obj.get("type", "")
        if kind in ("response.completed", "response.incomplete") and isinstance(
            obj.get("response"), dict
        ):
            return orjson.dumps(obj["response"])
    raise NotConvertible("no terminal response event in the stored stream")


def responses_to_sse(body: bytes) -> bytes:
    """A response object -> the event sequence the API streams, from response.created to
    response.completed (or response.incomplete) carrying the stored response."""
    doc = _object(body, "response")
    seq = 0
    out = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        out.append(_sse(orjson.dumps({"type": kind, "sequence_number": seq, **fields}), kind))
        seq += 1

    start = {**doc, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for n, item in enumerate(doc.get("output") or []):
        item_id = item.get("id")
        if item.get("type") == "message":
            emit(
                "response.output_item.added",
                output_index=n,
                item={**item, "status": "in_progress", "content": []},
            )
            for c, part in enumerate(item.get("content") or []):
                empty = {**part, "text": ""} if "text" in part else {**part}
                if part.get("type") == "output_text":
                    empty["annotations"] = []
                emit(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=n,
                    content_index=c,
                    part=empty,
                )
                if part.get("type") == "output_text":
                    emit(
                        "response.output_text.delta",
                        item_id=item_id,
                        output_index=n,
                        content_index=c,
                        delta=part.get("text", ""),
                        logprobs=[],
                    )
                    emit(
                        "response.output_text.done",
                        item_id=item_id,
                        output_index=n,
                        content_index=c,
                        text=part.get("text", ""),
                        logprobs=[],
                    )
                elif part.get("type") == "refusal":
                    emit(
                        "response.refusal.delta",
                        item_id=item_id,
                        output_index=n,
                        content_index=c,
                        delta=part.get("refusal", ""),
                    )
                    emit(
                        "response.refusal.done",
                        item_id=item_id,
                        output_index=n,
                        content_index=c,
                        refusal=part.get("refusal", ""),
                    )
                emit(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=n,
                    content_index=c,
                    part=part,
                )
        elif item.get("type") == "function_call":
            emit(
                "response.output_item.added",
                output_index=n,
                item={**item, "status": "in_progress", "arguments": ""},
            )
            emit(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=n,
                delta=item.get("arguments", ""),
            )
            emit(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=n,
                arguments=item.get("arguments", ""),
            )
        else:
            emit("response.output_item.added", output_index=n, item=item)
        emit("response.output_item.done", output_index=n, item=item)
    terminal = "response.incomplete" if doc.get("status") == "incomplete" else "response.completed"
    emit(terminal, response=doc)
    return b"".join(out)


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

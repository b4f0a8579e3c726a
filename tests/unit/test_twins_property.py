"""Twins against the official SDK's own stream accumulators, over generated answers: a
stream assembled by twins.py equals what openai-python's ChatCompletionStreamState /
ResponseStreamState make of it, and a stored object sent as a stream adds back up to itself.
Hypothesis prints the failing example and its reproduction blob (print_blob)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from proxy.errors import NotConvertible
from proxy.sse import events
from proxy.testing.fake_openai import recorded
from proxy.twins import chat_to_json, chat_to_sse, convert, responses_to_json, responses_to_sse

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=24)
IDENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
FLOAT = st.floats(-30, 0, allow_nan=False, allow_infinity=False)
TOKEN = st.fixed_dictionaries(
    {
        "token": TEXT,
        "logprob": FLOAT,
        "bytes": st.lists(st.integers(0, 255), max_size=3),
        "top_logprobs": st.lists(
            st.fixed_dictionaries({"token": TEXT, "logprob": FLOAT, "bytes": st.none()}),
            max_size=2,
        ),
    }
)
ANNOTATION = st.fixed_dictionaries(
    {
        "type": st.just("url_citation"),
        "url_citation": st.fixed_dictionaries(
            {
                "start_index": st.integers(0, 99),
                "end_index": st.integers(0, 99),
                "title": TEXT,
                "url": IDENT.map(lambda s: f"https://example.com/{s}"),
            }
        ),
    }
)
USAGE = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 9999),
        "completion_tokens": st.integers(0, 9999),
        "total_tokens": st.integers(0, 9999),
    },
    optional={
        "completion_tokens_details": st.fixed_dictionaries(
            {"reasoning_tokens": st.integers(0, 99), "audio_tokens": st.integers(0, 99)}
        )
    },
)


@st.composite
def chat_message(draw: Any) -> dict[str, Any]:
    """A chat.completion message with any mix of the fields the API returns."""
    msg: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | TEXT)}
    if draw(st.booleans()):
        msg["refusal"] = draw(st.none() | TEXT)
    if draw(st.booleans()):
        msg["annotations"] = draw(st.lists(ANNOTATION, max_size=2))  # [] included
    if draw(st.booleans()):
        calls = draw(st.lists(st.tuples(IDENT, TEXT), min_size=1, max_size=3))
        msg["tool_calls"] = [
            {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": a}}
            for n, (name, a) in enumerate(calls)
        ]
    if draw(st.booleans()):
        msg["function_call"] = {"name": draw(IDENT), "arguments": draw(TEXT)}
    if draw(st.booleans()):
        msg["audio"] = {
            "id": "audio_" + draw(IDENT),
            "data": draw(st.text("ABCDEFabcdef0123456789+/", max_size=16)),
            "expires_at": draw(st.integers(0, 2**31)),
            "transcript": draw(TEXT),
        }
    return msg


@st.composite
def chat_completion(draw: Any) -> dict[str, Any]:
    """A chat.completion object: one to three choices, logprobs or not, usage or not."""
    n = draw(st.integers(1, 3))
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {"index": i, "message": draw(chat_message())}
        choice["logprobs"] = draw(
            st.none() | st.fixed_dictionaries({"content": st.lists(TOKEN, max_size=3)})
        )
        choice["finish_reason"] = draw(
            st.sampled_from(["stop", "length", "tool_calls", "content_filter", "function_call"])
        )
        choices.append(choice)
    doc: dict[str, Any] = {
        "id": "chatcmpl-" + draw(IDENT),
        "object": "chat.completion",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(st.sampled_from(["gpt-4o-mini", "gpt-4o-audio-preview"])),
        "choices": choices,
        "system_fingerprint": draw(st.none() | IDENT),
    }
    if draw(st.booleans()):
        doc["service_tier"] = "default"
    if draw(st.booleans()):
        doc["usage"] = draw(USAGE)
    return doc


def split(draw: Any, text: str) -> list[str]:
    """`text` cut at drawn places (at least one piece)."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=3))))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return [p for p in pieces if p] or [text]


@st.composite
def chat_stream(draw: Any) -> tuple[dict[str, Any], bytes, bool]:
    """(the object, a stream the API could have sent for it, whether it carries usage):
    content, refusal, tool call arguments, audio and logprobs split across chunks, parallel
    calls, choices interleaved."""
    doc = draw(chat_completion())
    usage = "usage" in doc
    base = {k: doc[k] for k in ("id", "created", "model", "system_fingerprint") if k in doc}
    base["object"] = "chat.completion.chunk"
    if "service_tier" in doc:
        base["service_tier"] = doc["service_tier"]
    per_choice: list[list[dict[str, Any]]] = []
    for choice in doc["choices"]:
        i, msg = choice["index"], choice["message"]
        evs: list[dict[str, Any]] = []

        def ev(delta: dict[str, Any], logprobs: Any = None, finish: Any = None) -> None:
            evs.append({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})  # noqa: B023

        content = msg["content"]
        first: dict[str, Any] = {"role": "assistant", "content": "" if content else content}
        if "refusal" in msg:
            first["refusal"] = "" if msg["refusal"] == "" else None
        ev(first)
        tokens = list((choice["logprobs"] or {}).get("content") or [])
        for piece in split(draw, content) if content else []:
            take = draw(st.integers(0, len(tokens)))
            lp = {"content": tokens[:take], "refusal": None} if choice["logprobs"] else None
            tokens = tokens[take:]
            ev({"content": piece}, lp)
        if choice["logprobs"] is not None and (tokens or not content):
            ev({}, {"content": tokens, "refusal": None})
        for piece in split(draw, msg["refusal"]) if msg.get("refusal") else []:
            ev({"refusal": piece})
        if "annotations" in msg:
            ev({"annotations": msg["annotations"]})
        if "audio" in msg:
            audio = msg["audio"]
            pieces = split(draw, audio["transcript"])
            data = split(draw, audio["data"])
            for k in range(max(len(pieces), len(data))):
                part: dict[str, Any] = {}
                if k == 0:
                    part = {"id": audio["id"], "expires_at": audio["expires_at"]}
                part["transcript"] = pieces[k] if k < len(pieces) else ""
                part["data"] = data[k] if k < len(data) else ""
                ev({"audio": part})
        if "function_call" in msg:
            fc = msg["function_call"]
            ev({"function_call": {"name": fc["name"], "arguments": ""}})
            for piece in split(draw, fc["arguments"]) if fc["arguments"] else []:
                ev({"function_call": {"arguments": piece}})
        calls = msg.get("tool_calls") or []
        frags: list[list[dict[str, Any]]] = []
        for n, call in enumerate(calls):
            fn = call["function"]
            head = {"index": n, "id": call["id"], "type": "function"}
            mine = [{**head, "function": {"name": fn["name"], "arguments": ""}}]
            for piece in split(draw, fn["arguments"]) if fn["arguments"] else []:
                mine.append({"index": n, "function": {"arguments": piece}})
            frags.append(mine)
        begun = 0
        while any(frags):  # parallel calls: their fragments interleaved, each in order
            # a call starts only once the calls before it have started (as the API sends them)
            n = draw(st.sampled_from([n for n, f in enumerate(frags) if f and n <= begun]))
            begun += n == begun
            ev({"tool_calls": [frags[n].pop(0)]})
        ev({}, None, choice["finish_reason"])
        per_choice.append(evs)
    order: list[dict[str, Any]] = []
    started = 0
    while any(per_choice):
        ready = [k for k, evs in enumerate(per_choice) if evs and k <= started]
        k = draw(st.sampled_from(ready))
        if k == started:
            started += 1
        order.append(per_choice[k].pop(0))
    out = []
    for choice_ev in order:
        chunk = {**base, "choices": [choice_ev]}
        if usage:
            chunk["usage"] = None
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if usage:
        out.append(
            b"data: " + orjson.dumps({**base, "choices": [], "usage": doc["usage"]}) + b"\n\n"
        )
    out.append(b"data: [DONE]\n\n")
    return doc, b"".join(out), usage


def sdk_chat(stream: bytes) -> dict[str, Any]:
    """What openai-python's ChatCompletionStreamState makes of a stream."""
    state: Any = ChatCompletionStreamState()
    for _name, data in events(stream):
        if data == b"[DONE]":
            break
        state.handle_chunk(construct_type(type_=ChatCompletionChunk, value=orjson.loads(data)))
    # (its snapshot: get_final_completion would also parse, and refuse finish_reason=length)
    final: dict[str, Any] = state.current_completion_snapshot.model_dump(mode="json")
    return final


def completion(doc: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion as the SDK's model of it (missing and null alike), without the
    SDK's own additions (parsed, parsed_arguments) and the stream's merge key (index)."""
    doc = orjson.loads(orjson.dumps(doc))
    for choice in doc.get("choices") or []:
        msg = choice.get("message") or {}
        msg.pop("parsed", None)
        for call in msg.get("tool_calls") or []:
            call.pop("index", None)
            call.get("function", {}).pop("parsed_arguments", None)
    dumped: dict[str, Any] = ChatCompletion.model_validate(doc).model_dump(mode="json")
    return dumped


@SETTINGS
@given(chat_stream())
def test_chat_stream_to_json_is_what_the_sdk_accumulates(
    case: tuple[dict[str, Any], bytes, bool],
) -> None:
    """A generated chat stream, assembled by twins.py, equals openai-python's own result,
    and the object it was cut from (but for usage when the stream had none)."""
    doc, stream, usage = case
    mine = orjson.loads(chat_to_json(stream))
    assert completion(mine) == completion(sdk_chat(stream))
    if not usage:
        doc = {**doc}
        doc.pop("usage", None)
    assert completion(mine) == completion(doc)


@SETTINGS
@given(chat_completion())
def test_chat_json_to_stream_adds_back_up_to_the_json(doc: dict[str, Any]) -> None:
    """A chat.completion sent as a stream (with include_usage) adds back up to itself in the
    SDK's accumulator and in twins.py; without include_usage, to itself without usage."""
    body = orjson.dumps(doc)
    stream = chat_to_sse(body, include_usage=True)
    assert completion(sdk_chat(stream)) == completion(doc)
    assert completion(orjson.loads(chat_to_json(stream))) == completion(doc)
    bare = {k: v for k, v in doc.items() if k != "usage"}
    assert completion(sdk_chat(chat_to_sse(body, include_usage=False))) == completion(bare)


# -- Responses --------------------------------------------------------------------------------
@st.composite
def response_object(draw: Any) -> dict[str, Any]:
    """A response object: messages (text with annotations and logprobs, refusals), function
    calls (parallel), reasoning; completed or incomplete."""
    output: list[dict[str, Any]] = []
    for n in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["message", "function_call", "reasoning"]))
        if kind == "message":
            parts: list[dict[str, Any]] = []
            for _ in range(draw(st.integers(1, 2))):
                if draw(st.booleans()):
                    part: dict[str, Any] = {
                        "type": "output_text",
                        "text": draw(TEXT),
                        "annotations": draw(st.lists(ANNOTATION, max_size=2)),
                    }
                    if draw(st.booleans()):
                        part["logprobs"] = draw(st.lists(TOKEN, max_size=2))
                    parts.append(part)
                else:
                    parts.append({"type": "refusal", "refusal": draw(TEXT)})
            output.append(
                {
                    "id": f"msg_{n}",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": parts,
                }
            )
        elif kind == "function_call":
            output.append(
                {
                    "id": f"fc_{n}",
                    "type": "function_call",
                    "status": "completed",
                    "call_id": f"call_{n}",
                    "name": draw(IDENT),
                    "arguments": draw(TEXT),
                }
            )
        else:
            output.append(
                {
                    "id": f"rs_{n}",
                    "type": "reasoning",
                    "summary": [{"type": "summary_text", "text": draw(TEXT)}],
                }
            )
    status = draw(st.sampled_from(["completed", "incomplete"]))
    return {
        "id": "resp_" + draw(IDENT),
        "object": "response",
        "created_at": draw(st.integers(0, 2**31)),
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "error": None,
        "model": "gpt-4.1",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": draw(st.integers(0, 999)),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": draw(st.integers(0, 999)),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": draw(st.integers(0, 999)),
        },
    }


def sdk_response(stream: bytes) -> dict[str, Any]:
    """The response openai-python's ResponseStreamState ends with (the completed one, or the
    incomplete event's)."""
    state: Any = ResponseStreamState(input_tools=omit, text_format=omit)
    last: Any = None
    for _name, data in events(stream):
        for event in state.handle_event(
            construct_type(type_=ResponseStreamEvent, value=orjson.loads(data))
        ):
            last = event
    final = state._completed_response or last.response
    dumped: dict[str, Any] = final.model_dump(mode="json", exclude_none=True)
    return dumped


def response(doc: dict[str, Any]) -> dict[str, Any]:
    """A response as the SDK's model of it (missing and null alike), without the SDK's
    parsed additions."""
    doc = orjson.loads(orjson.dumps(doc))
    doc.pop("output_parsed", None)
    for item in doc.get("output") or []:
        item.pop("parsed_arguments", None)
        for part in item.get("content") or []:
            part.pop("parsed", None)
    model: Any = construct_type(type_=Response, value=doc)  # leniently, as the SDK reads it
    dumped: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return dumped


@SETTINGS
@given(response_object(), st.booleans())
def test_responses_both_ways_against_the_sdk(doc: dict[str, Any], no_output: bool) -> None:
    """A response sent as a stream adds back up to itself in the SDK's ResponseStreamState;
    the stream assembled by twins.py equals the SDK's result, also when the terminal event
    carries no output (then the output_item.done items are the output)."""
    stream = responses_to_sse(orjson.dumps(doc))
    assert response(sdk_response(stream)) == response(doc)
    if no_output:  # a terminal event without its output, as some streams send it
        head, _, last = stream.rstrip(b"\n").rpartition(b"\n\n")
        name, _, data = last.partition(b"\ndata: ")
        terminal = orjson.loads(data)
        terminal["response"].pop("output")
        stream = head + b"\n\n" + name + b"\ndata: " + orjson.dumps(terminal) + b"\n\n"
    mine = orjson.loads(responses_to_json(stream))
    assert response(mine) == response(sdk_response(stream)) == response(doc)


# -- the recorded real answers, both ways ---------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("chat_completion_tool_call_streamed", "chat"),
        ("chat_completion_stream_prompt_caching_cache_read", "chat"),
        ("response_stream", "responses"),
        ("response_stream_incomplete", "responses"),
    ],
)
def test_recorded_streams_both_ways(name: str, kind: str) -> None:
    """Each recorded real stream assembles to what the SDK makes of it, and that object sent
    as a stream assembles to itself again."""
    stream = recorded(name)["response"]["body_text"].encode()
    as_json = convert(kind, stream, to_stream=False, include_usage=False)
    norm, sdk = (completion, sdk_chat) if kind == "chat" else (response, sdk_response)
    assert norm(orjson.loads(as_json)) == norm(sdk(stream))
    again = convert(kind, as_json, to_stream=True, include_usage=True)
    assert norm(sdk(again)) == norm(orjson.loads(as_json))


def test_recorded_json_answer_both_ways() -> None:
    """The recorded real tool-call answer, streamed and assembled, keeps every field."""
    body = recorded("chat_completion_tool_call")["response"]["body_text"].encode()
    doc = orjson.loads(body)
    stream = chat_to_sse(body, include_usage=True)
    assert completion(sdk_chat(stream)) == completion(doc)
    (choice,) = orjson.loads(chat_to_json(stream))["choices"]
    assert choice["message"] == doc["choices"][0]["message"]  # byte for byte, field for field
    assert choice["finish_reason"] == "tool_calls"


def test_a_damaged_stream_is_not_convertible() -> None:
    """A list delta whose index is not an integer (a damaged entry) is NotConvertible."""
    head = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":'
    stream = head + b'{"tool_calls":[{"index":0,"id":"a"}]}}]}\n\n'
    stream += head + b'{"tool_calls":[{"index":"x"}]}}]}\n\n'
    with pytest.raises(NotConvertible):
        convert("chat", stream, to_stream=False, include_usage=False)

"""Streamed / non-streamed twins share one entry: whichever form was stored serves both,
through the official Python SDK (sync and async)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson

from proxy.stores.memory import MemoryStore
from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, async_sdk, sdk
from tests.helpers import eventually, wait_until

PROMPT: list[Any] = [{"role": "user", "content": "twin persona"}]


def stream_chat(c: openai.OpenAI, **kw: Any) -> tuple[Any, ...]:
    """(x-cache-status, text, tool calls, usage, finish reason) of a streamed chat."""
    with c.chat.completions.with_streaming_response.create(
        stream=True, stream_options={"include_usage": True}, **kw
    ) as resp:
        text, usage, finish = "", None, None
        calls: dict[int, Any] = {}
        for chunk in resp.parse():
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
                for call in ch.delta.tool_calls or []:
                    slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
        return resp.headers["x-cache-status"], text, list(calls.values()), usage, finish


def json_chat(c: openai.OpenAI, **kw: Any) -> tuple[Any, ...]:
    raw = c.chat.completions.with_raw_response.create(**kw)
    r = raw.parse()
    msg = r.choices[0].message
    calls = [
        {"name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls or []
    ]
    return (
        raw.headers["x-cache-status"],
        msg.content or "",
        calls,
        r.usage.model_dump(),
        r.choices[0].finish_reason,
    )


def test_chat_json_first_then_stream(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A stored JSON answer serves a streaming client: same text, usage and finish reason."""
    with sdk(proxy) as c:
        a = json_chat(c, model="gpt-4o-mini", messages=PROMPT)
        b = stream_chat(c, model="gpt-4o-mini", messages=PROMPT)
    assert a[0] == "MISS" and b[0] == "HIT" and a[1:] == b[1:]
    assert fake.count("/v1/chat/completions") == 1


def test_chat_stream_first_then_json(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A chat answer stored as a stream serves the JSON twin and the stream itself as HITs with the
    same content."""
    with sdk(proxy) as c:
        a = stream_chat(c, model="gpt-4o-mini", messages=PROMPT)
        b = json_chat(c, model="gpt-4o-mini", messages=PROMPT)
        c_ = stream_chat(c, model="gpt-4o-mini", messages=PROMPT)  # the stored form itself
    assert (a[0], b[0], c_[0]) == ("MISS", "HIT", "HIT") and a[1:] == b[1:] == c_[1:]
    assert fake.count("/v1/chat/completions") == 1


def test_tool_calls_both_ways(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """The recorded real tool call, stored as JSON or as a stream, reaches the other form
    with the same function name and arguments."""
    tools = [
        {
            "type": "function",
            "function": {"name": "extract_student_info", "parameters": {"type": "object"}},
        }
    ]
    with sdk(proxy) as c:
        a = json_chat(c, model="recorded-tools", messages=PROMPT, tools=tools)
        b = stream_chat(c, model="recorded-tools", messages=PROMPT, tools=tools)
        other = [{"role": "user", "content": "another"}]
        d = stream_chat(c, model="recorded-tools", messages=other, tools=tools)
        e = json_chat(c, model="recorded-tools", messages=other, tools=tools)
    assert b[0] == e[0] == "HIT"
    assert a[2] == b[2] and a[2][0]["name"] == "extract_student_info" and a[4] == b[4]
    assert d[2] == e[2] and orjson.loads(d[2][0]["arguments"]) and d[3] == e[3]


def test_responses_both_ways(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Responses: a stored response serves the stream helper (created .. completed) and a
    stored stream serves a plain create, with the same text and usage."""
    with sdk(proxy) as c:
        plain = c.responses.with_raw_response.create(model="gpt-4.1", input="twin responses")
        with c.responses.stream(model="gpt-4.1", input="twin responses") as stream:
            deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            final = stream.get_final_response()
        first = plain.parse()
        assert plain.headers["x-cache-status"] == "MISS"
        assert deltas == final.output_text == first.output_text
        assert final.usage == first.usage and final.id == first.id
        with c.responses.stream(model="recorded", input="recorded twin") as stream:
            streamed = stream.get_final_response()
        again = c.responses.with_raw_response.create(model="recorded", input="recorded twin")
        assert again.headers["x-cache-status"] == "HIT"
        assert again.parse().output_text == streamed.output_text and again.parse().usage
    assert fake.count("/v1/responses") == 2


def test_another_field_is_not_served_from_the_twin(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A twin that differs in another field (temperature) is a MISS and goes upstream."""
    with sdk(proxy) as c:
        json_chat(c, model="gpt-4o-mini", messages=PROMPT)
        assert stream_chat(c, model="gpt-4o-mini", messages=PROMPT, temperature=0.2)[0] == "MISS"
    assert fake.count("/v1/chat/completions") == 2


async def test_twins_in_flight_each_go_upstream(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A streamed and a non-streamed request in flight at once do not share the live answer
    (a live stream is not converted half-way): two upstream calls; later both forms HIT,
    whichever was stored last (the stream asks its usage, so either form serves the other)."""
    usage: Any = {"include_usage": True}
    async with async_sdk(proxy) as c:
        fake.hold()  # neither answer comes before both requests are in flight
        try:
            stream_call = asyncio.ensure_future(
                c.chat.completions.create(
                    model="gpt-4o-mini", messages=PROMPT, stream=True, stream_options=usage
                )
            )
            json_call = asyncio.ensure_future(
                c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
            )
            # the second did not join the first one's flight: it went upstream too
            await wait_until(lambda: fake.count("/v1/chat/completions") == 2, 30.0)
        finally:
            fake.release()
        stream, _plain = await asyncio.gather(stream_call, json_call)
        async for _ in stream:
            pass
        assert fake.count("/v1/chat/completions") == 2
        await asyncio.sleep(0.1)  # both stored (the last one written is the entry)
        forms: tuple[dict[str, Any], ...] = ({"stream": True, "stream_options": usage}, {})
        for form in forms:
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=PROMPT, **form
            )
            assert raw.headers["x-cache-status"] == "HIT"
    assert fake.count("/v1/chat/completions") == 2


def test_a_large_answer_converts_off_the_loop_and_whole(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A stored answer over 64 KB is converted on the worker pool (not the event loop) and
    reaches the streaming client whole; it is too large to be memoised, and converts again."""
    fake.chunks = 40_000  # about 340 KB of content: past the memo bound (256 KB)
    with sdk(proxy) as c:
        a = json_chat(c, model="gpt-4o-mini", messages=PROMPT)
        assert len(a[1]) > 64 * 1024
        store = proxy.state.cache.store
        assert isinstance(store, MemoryStore)
        eventually(lambda: len(store) == 1)  # stored after it was relayed
        for _ in range(2):
            b = stream_chat(c, model="gpt-4o-mini", messages=PROMPT)
            assert b[0] == "HIT" and b[1:] == a[1:]
    assert proxy.state.converted == {} and fake.count("/v1/chat/completions") == 1

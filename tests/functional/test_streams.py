"""Streamed answers: relayed live, recorded, stored only when whole, replayed byte for byte
(issue 3)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from structlog.testing import capture_logs

from proxy.testing import FakeOpenAI
from proxy.testing.fake_openai import recorded
from tests.conftest import ProxyServer, async_sdk
from tests.helpers import HEADERS, joined, post_stream, wait_until

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Stream a persona"}],
    "stream": True,
}


async def test_miss_is_relayed_live_not_buffered(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """With 2 chunks a second apart, the client has the first chunk before the second is
    sent (a relay that waits for more, or for the end, has it a second later or more)."""
    fake.chunks, fake.chunk_delay = 2, 1.0
    status, headers, chunks = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    assert headers["Content-Type"].startswith("text/event-stream")
    assert chunks[0][0] < fake.sent[1], "first chunk arrived only after the second was sent"
    assert b"word1" not in chunks[0][1]  # the first chunk alone
    assert joined(chunks).endswith(b"data: [DONE]\n\n")
    assert joined(chunks).count(b"data: ") == 3  # 2 chunks and [DONE]


async def test_hit_replays_identical_bytes(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A repeated streamed request is a HIT with the very same bytes and no upstream call."""
    _, _, first = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    await wait_until(lambda: len(proxy.state.flights) == 0)
    status, headers, second = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-Cache-Status"] == "HIT"
    assert headers["Content-Type"].startswith("text/event-stream")
    assert joined(second) == joined(first)
    assert fake.count() == 1


async def test_recorded_real_stream_replays_byte_for_byte(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """The recorded real OpenAI stream (usage chunk included) comes back byte for byte."""
    body = {**CHAT, "model": "recorded", "stream_options": {"include_usage": True}}
    want = recorded("chat_completion_stream_prompt_caching_cache_read")["response"]["body_text"]
    _, _, first = await post_stream(proxy.url + "/v1/chat/completions", body)
    await wait_until(lambda: len(proxy.state.flights) == 0)
    _, headers, second = await post_stream(proxy.url + "/v1/chat/completions", body)
    assert headers["X-Cache-Status"] == "HIT"
    assert joined(first) == joined(second) == want.encode()


async def test_sdk_chat_stream_with_usage_same_text_and_usage(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """The SDK's stream parser yields the same text and usage from a HIT as from the MISS."""

    async def run() -> tuple[str, dict[str, Any] | None]:
        async with async_sdk(proxy) as c:
            stream = await c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "usage please"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage.model_dump()
            return text, usage

    first = await run()
    await wait_until(lambda: len(proxy.state.flights) == 0)
    second = await run()
    assert first == second
    usage = first[1]
    assert first[0] and usage is not None and usage["completion_tokens"] == 8
    assert fake.count() == 1


@pytest.mark.parametrize("model", ["gpt-4.1", "recorded"])
async def test_sdk_responses_stream_helper(
    proxy: ProxyServer, fake: FakeOpenAI, model: str
) -> None:
    """client.responses.stream(...) gives the same text and usage from a HIT."""

    async def run() -> tuple[str, str, dict[str, Any]]:
        async with async_sdk(proxy) as c:
            async with c.responses.stream(model=model, input="Who won in 2020?") as stream:
                deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
                final = await stream.get_final_response()
            assert final.usage is not None
            return "".join(deltas), final.output_text, final.usage.model_dump()

    first = await run()
    await wait_until(lambda: len(proxy.state.flights) == 0)
    second = await run()
    assert first == second and first[0] == first[1]
    assert fake.count() == 1


@pytest.mark.parametrize("knob", ["cut_after", "error_after"])
async def test_broken_chat_stream_is_shown_and_not_stored(
    proxy: ProxyServer, fake: FakeOpenAI, knob: str
) -> None:
    """A stream cut half-way, or carrying an error event, reaches the client as such and is
    not stored: the next request goes upstream again."""
    setattr(fake, knob, 4)
    if knob == "cut_after":
        with pytest.raises(aiohttp.ClientPayloadError):
            await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    else:
        _, _, chunks = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
        assert b'"error"' in joined(chunks) and b"[DONE]" not in joined(chunks)
    await wait_until(lambda: len(proxy.state.flights) == 0)
    setattr(fake, knob, None)
    _, headers, chunks = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert headers["X-Cache-Status"] == "MISS"
    assert joined(chunks).endswith(b"data: [DONE]\n\n")
    assert fake.count() == 2


async def test_sdk_sees_the_cut(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Through the SDK, a cut stream raises instead of ending quietly."""
    fake.cut_after = 3
    async with async_sdk(proxy) as c:
        with pytest.raises((openai.APIError, Exception)) as info:
            stream = await c.chat.completions.create(**CHAT)
            async for _ in stream:
                pass
    assert not isinstance(info.value, AssertionError)


async def test_response_failed_is_not_stored(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A Responses stream ending in response.failed is relayed but never stored."""
    fake.fail_responses = True
    body = {"model": "gpt-4.1", "input": "x", "stream": True}
    _, _, chunks = await post_stream(proxy.url + "/v1/responses", body)
    assert b"response.failed" in joined(chunks)
    await wait_until(lambda: len(proxy.state.flights) == 0)
    fake.fail_responses = False
    _, headers, chunks = await post_stream(proxy.url + "/v1/responses", body)
    assert headers["X-Cache-Status"] == "MISS" and b"response.completed" in joined(chunks)
    assert fake.count() == 2


async def test_client_hangs_up_answer_still_kept(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A client leaving after the first chunk: upstream is read to the end and stored; the
    identical request afterwards is a HIT with the complete stream, 1 upstream call in all."""
    fake.chunk_delay = 0.03
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", data=orjson.dumps(CHAT), headers=HEADERS) as r,
    ):
        first = await r.content.readany()
        assert first.startswith(b"data: ")
    await wait_until(lambda: len(proxy.state.flights) == 0)
    _status, headers, chunks = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert headers["X-Cache-Status"] == "HIT"
    assert joined(chunks).startswith(first) and joined(chunks).endswith(b"data: [DONE]\n\n")
    assert fake.count() == 1


async def test_stream_above_record_limit_is_relayed_not_stored(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """A stream larger than --max-record-mb reaches the client whole but is not stored."""
    proxy = start_proxy(max_record_mb=0.0005)  # about 500 bytes
    _, _, chunks = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert joined(chunks).endswith(b"data: [DONE]\n\n") and len(joined(chunks)) > 600
    await wait_until(lambda: len(proxy.state.flights) == 0)
    _, headers, _ = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    assert headers["X-Cache-Status"] == "MISS"


async def test_paced_replay_follows_recorded_timing(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """replay = "paced" replays a stored stream at the pace recorded with it (chunk_ms, the
    chunks' times after the first): the first chunk at once, the last when it came."""
    rules = tmp_path / "paced.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\nreplay = "paced"\n')
    proxy = start_proxy(rules=rules)
    fake.chunks, fake.chunk_delay = 4, 0.3  # 4 chunks and [DONE], 1.2 s in all
    _, _, first = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    await wait_until(lambda: len(proxy.state.flights) == 0)
    store: Any = proxy.state.cache.store
    ((_, (_, entry)),) = list(store._items.items())
    recorded_s = entry.chunk_ms[-1] / 1000  # when the last chunk came, after the first
    assert recorded_s >= 3 * 0.3, recorded_s
    t0 = time.monotonic()
    _, headers, second = await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    took = time.monotonic() - t0
    assert headers["X-Cache-Status"] == "HIT" and joined(second) == joined(first)
    assert took >= recorded_s - 0.005, (took, recorded_s)  # (timers may fire a hair early)
    # not all at the end (a client stall could only make the first one later)
    assert second[0][0] - t0 < recorded_s / 2, (second[0][0] - t0, recorded_s)


async def test_log_line_says_stream_ttfb_and_chunks(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """request.done says the request streamed, its time to first byte and chunk count."""
    with capture_logs() as logs:
        await post_stream(proxy.url + "/v1/chat/completions", CHAT)
    done = [e for e in logs if e["event"] == "request.done"]
    assert len(done) == 1
    line = done[0]
    assert line["stream"] is True and line["cache"] == "miss"
    assert line["ttfb_ms"] > 0 and line["chunks"] >= 1 and line["bytes"] > 0
    assert "Bearer" not in orjson.dumps(line).decode()


async def test_streamed_image_generation_is_recorded_and_replayed(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A gpt-image stream (partial images, then image_generation.completed) is stored whole and
    replayed byte for byte."""
    body = {"model": "gpt-image-1", "prompt": "a cat", "stream": True, "partial_images": 2}
    _, h1, first = await post_stream(proxy.url + "/v1/images/generations", body)
    assert h1["X-Cache-Status"] == "MISS"
    assert joined(first).count(b"image_generation.partial_image") == 4  # event: and type
    await wait_until(lambda: len(proxy.state.flights) == 0)
    _, h2, second = await post_stream(proxy.url + "/v1/images/generations", body)
    assert h2["X-Cache-Status"] == "HIT" and joined(second) == joined(first)
    assert fake.count() == 1


def test_binary_speech_is_cached_whole(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """audio.speech (binary MP3 bytes, chunked) is stored complete and replayed identical."""
    from tests.conftest import sdk

    with sdk(proxy) as c:
        a = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Hello")
        b = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Hello")
        assert a.headers["x-cache-status"] == "MISS" and b.headers["x-cache-status"] == "HIT"
        assert b.headers["content-type"] == "audio/mpeg"
        assert a.content == b.content and a.content.startswith(b"ID3")
    assert fake.count() == 1


def test_a_large_answer_is_checked_off_the_loop_and_stored(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """An answer over fetch.VERDICT_OFF_LOOP (here 1 MB of speech) is checked on a worker
    thread and then stored: the repeat is a HIT, byte for byte, with one upstream call."""
    from tests.conftest import sdk
    from tests.helpers import eventually

    fake.speech_mb = 1
    with sdk(proxy) as c:
        a = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Long")
        eventually(lambda: len(proxy.state.flights) == 0)  # checked and kept
        b = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Long")
    assert a.headers["x-cache-status"] == "MISS" and b.headers["x-cache-status"] == "HIT"
    assert len(a.content) == 1024 * 1024 and b.content == a.content
    assert fake.count() == 1


def test_an_answer_past_max_record_mb_reaches_its_leader_whole_and_live(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """A whole (non-streamed) answer larger than max_record_mb and the lag window (8 MB of
    speech, limit 1 MB) is not stored, but its own client gets every byte, relayed as it
    arrives: the leader reads the flight as a reader like any other."""
    from tests.conftest import sdk

    proxy = start_proxy(max_record_mb=1)
    fake.speech_mb = 8
    with sdk(proxy) as c:
        a = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Huge")
        b = c.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Huge")
    assert len(a.content) == 8 * 1024 * 1024 and b.content == a.content
    assert a.headers["x-cache-status"] == "MISS" and b.headers["x-cache-status"] == "MISS"
    assert fake.count() == 2

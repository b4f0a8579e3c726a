"""Flight lifecycle after the take/feed/inline refactor, attacked as a client and as an
upstream: inline (whole) answers over 1 MB, over max_record_mb, shared with joiners."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from proxy.testing import FakeOpenAI
from tests.conftest import BackgroundLoop, ProxyServer, RedisServer
from tests.helpers import HEADERS, flight_readers, joined, post_json, post_stream, wait_until

BIG = "x" * (2 * 1024 * 1024)


async def _big_burst(
    proxy: ProxyServer, fake: FakeOpenAI, prompt: str, n: int
) -> tuple[str, dict[str, Any], list[tuple[int, Any, bytes]]]:
    """`n` identical chat requests at once whose answer is BIG, held at the upstream until the
    n - 1 duplicates have joined the flight (its leader reads the answer whole itself, without
    a reader): the URL, the request, and each (status, headers, body)."""
    fake.model_replies["big"] = BIG
    url = proxy.url + "/v1/chat/completions"
    chat: dict[str, Any] = {"model": "big", "messages": [{"role": "user", "content": prompt}]}
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(post_json(url, chat)) for _ in range(n)]
        await wait_until(lambda: fake.count() == 1 and flight_readers(proxy) == n - 1, 30.0)
    finally:
        fake.release()
    return url, chat, list(await asyncio.gather(*jobs))


async def test_a_large_inline_answer_reaches_leader_and_joiners_whole(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A 2 MB non-streamed chat answer (read inline, relayed through a late reader) reaches
    the leader and 5 joiners whole and identical, from one upstream call, then is a HIT."""
    url, chat, results = await _big_burst(proxy, fake, "big one", 6)
    assert fake.count() == 1
    bodies = {b for _, _, b in results}
    assert len(bodies) == 1
    answer = orjson.loads(next(iter(bodies)))
    assert answer["choices"][0]["message"]["content"] == BIG
    status, headers, body = await post_json(url, chat)
    assert status == 200 and headers["X-Cache-Status"] == "HIT" and body in bodies


async def test_an_inline_answer_over_max_record_mb_reaches_everyone_unstored(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """An inline answer larger than max_record_mb (its flight overflows: no whole body)
    reaches the leader and its joiners whole, and is not stored."""
    proxy = start_proxy(max_record_mb=1.0)
    url, chat, results = await _big_burst(proxy, fake, "big two", 4)
    assert fake.count() == 1
    for status, _, body in results:
        assert status == 200
        assert orjson.loads(body)["choices"][0]["message"]["content"] == BIG
    status, headers, _ = await post_json(url, chat)
    assert status == 200 and headers["X-Cache-Status"] == "MISS" and fake.count() == 2


def _no_coalesce(tmp_path: Path) -> Path:
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\ncoalesce = false\n')
    return rules


async def test_without_coalescing_on_redis_an_inline_answer_is_stored_and_let_go(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer, tmp_path: Path
) -> None:
    """coalesce = false on Redis (read inline; Cache.put declines, set() stores): duplicates
    each go upstream, the answer is stored (the next one is a HIT), and no flight stays."""
    proxy = start_proxy(cache=redis_server.url, rules=_no_coalesce(tmp_path))
    fake.latency = 0.3
    url = proxy.url + "/v1/chat/completions"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "nc"}]}
    results = await asyncio.gather(*(post_json(url, chat) for _ in range(3)))
    assert [s for s, _, _ in results] == [200] * 3 and fake.count() == 3
    r = redis.Redis.from_url(redis_server.url)
    try:  # set() wrote it to Redis (not only to this process's hot tier)
        await wait_until(lambda: any(r.scan_iter(match="ocp:resp:*")), 5.0)
    finally:
        r.close()
    status, headers, _ = await post_json(url, chat)
    assert status == 200 and headers["X-Cache-Status"] == "HIT" and fake.count() == 3
    assert len(proxy.state.flights) == 0


async def test_without_coalescing_streams_are_stored_and_let_go(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """coalesce = false: concurrent identical streams each go upstream whole, and no flight
    stays registered afterwards."""
    proxy = start_proxy(rules=_no_coalesce(tmp_path))
    fake.chunk_delay = 0.02
    url = proxy.url + "/v1/chat/completions"
    stream = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "s"}],
        "stream": True,
    }
    results = await asyncio.gather(*(post_stream(url, stream) for _ in range(3)))
    assert fake.count() == 3
    assert all(joined(c).endswith(b"data: [DONE]\n\n") for _, _, c in results)
    await asyncio.sleep(0.1)
    assert len(proxy.state.flights) == 0


class HalfAnswer:
    """A raw upstream: each chat request gets a 200 head promising N bytes, half of them
    after `delay_s`, then the connection closes. Like FakeOpenAI, hold() makes each request
    counted (`calls`) wait for release() (from any thread) before its answer."""

    def __init__(self, delay_s: float = 0.1) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.server: asyncio.Server | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: asyncio.Event | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(gate.set)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        await reader.readexactly(length)
        self.calls += 1
        gate = self._gate
        if gate is not None:
            await gate.wait()
        body = orjson.dumps({"id": "x", "object": "chat.completion", "choices": []}) * 50
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        await asyncio.sleep(self.delay_s)
        writer.write(body[: len(body) // 2])
        await writer.drain()
        writer.close()


async def _raw_post(url: str, body: dict[str, Any]) -> tuple[int, bytes, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=orjson.dumps(body), headers=HEADERS) as r,
    ):
        try:
            return r.status, await r.read(), r.headers.get("X-Cache-Status", "")
        except aiohttp.ClientPayloadError:
            return r.status, b"<cut>", r.headers.get("X-Cache-Status", "")


async def test_an_inline_answer_cut_short_is_a_cut_for_leader_and_joiners(
    start_proxy: Any, bg: BackgroundLoop
) -> None:
    """A non-streamed chat answer whose upstream closes half-way (read inline, no leader
    reader): the leader and its 3 joiners (held until they joined) all see a cut, nothing is
    stored, no flight stays, and the next request goes upstream again."""
    up = HalfAnswer()
    bg.run(up.start())
    try:
        proxy = start_proxy(upstream=up.url)
        url = proxy.url + "/v1/chat/completions"
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cut"}]}
        up.hold()
        try:
            jobs = [asyncio.ensure_future(_raw_post(url, chat)) for _ in range(4)]
            await wait_until(lambda: up.calls == 1 and flight_readers(proxy) == 3, 30.0)
        finally:
            up.release()
        results = await asyncio.gather(*jobs)
        assert up.calls == 1
        assert [b for _, b, _ in results] == [b"<cut>"] * 4, results
        await asyncio.sleep(0.1)
        assert len(proxy.state.flights) == 0
        _, body, label = await _raw_post(url, chat)
        assert up.calls == 2 and label == "MISS" and body == b"<cut>"
    finally:
        bg.run(up.stop())


async def test_an_answer_with_an_odd_usage_is_answered_and_its_flight_let_go(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A 200 chat answer whose usage holds a non-number cached_tokens (a misbehaving
    upstream) reaches its client, and leaves no flight behind that later requests would
    join forever."""
    answer = {
        "id": "chatcmpl-odd",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "total_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": "many"},
        },
    }
    fake.errors = [(200, orjson.dumps(answer))]
    url = proxy.url + "/v1/chat/completions"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "odd usage"}]}
    status, _, body = await post_json(url, chat)
    assert status == 200 and orjson.loads(body)["id"] == "chatcmpl-odd"
    await asyncio.sleep(0.1)
    assert len(proxy.state.flights) == 0
    status, headers, _ = await post_json(url, chat)
    assert status == 200 and headers["X-Cache-Status"] != "COALESCED"


async def test_a_failure_to_make_an_entry_still_answers_and_lets_the_flight_go(
    proxy: ProxyServer, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes building the stored entry fail (a bug, odd upstream bytes), the
    answer reaches its client unstored and its flight is let go, for streams too."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("entry failed")

    monkeypatch.setattr("proxy.fetch.make_entry", broken)
    url = proxy.url + "/v1/chat/completions"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "no entry"}]}
    status, _, body = await post_json(url, chat)
    assert status == 200 and orjson.loads(body)["object"] == "chat.completion"
    _, _, chunks = await post_stream(url, {**chat, "stream": True})
    assert joined(chunks).endswith(b"data: [DONE]\n\n")
    await asyncio.sleep(0.1)
    assert len(proxy.state.flights) == 0

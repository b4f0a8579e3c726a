"""Redis: one cache and one flight per request across instances; fail open (issue 5)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from structlog.testing import capture_logs

from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, RedisServer, sdk, spawn_proxy, start_redis
from tests.helpers import flight_readers, joined, post_json, post_stream, wait_until

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Shared persona"}],
}
# Its own prompt: a stream of CHAT's prompt would be CHAT's twin (served from its answer).
STREAM = {**CHAT, "messages": [{"role": "user", "content": "Shared stream"}], "stream": True}
ROOT = Path(__file__).resolve().parents[2]
CHAT_PATH = "/v1/chat/completions"


def assert_clean(url: str) -> None:
    """No API key anywhere, and every key has a TTL (but the shared key secret's record)."""
    r = redis.Redis.from_url(url)
    try:
        for key in r.scan_iter(count=1000):
            assert r.pttl(key) != -1 or key.endswith(b":meta:key-secret"), (
                key
            )  # -1: no TTL (-2: gone since the scan, fine)
            kind = r.type(key)
            blob = key + (
                r.get(key) or b""
                if kind == b"string"
                else orjson.dumps(
                    [[str(k), str(v)] for _, f in r.xrange(key) or [] for k, v in (f or {}).items()]
                )
                if kind == b"stream"
                else b""
            )
            assert b"sk-" not in blob and b"Bearer" not in blob, key
    finally:
        r.close()


@pytest.fixture
def two(start_proxy: Any, redis_server: RedisServer) -> Iterator[tuple[ProxyServer, ProxyServer]]:
    """Two proxy instances sharing one Redis (the default 5 s lease: a short one could run
    out while a loaded machine stalls a leader, and a follower would fetch again)."""
    a = start_proxy(cache=redis_server.url)
    b = start_proxy(cache=redis_server.url)
    yield a, b
    assert_clean(redis_server.url)


async def held_burst(
    fake: FakeOpenAI, proxies: tuple[ProxyServer, ...], n: int, ask: Callable[[int], Awaitable[Any]]
) -> list[Any]:
    """`n` requests `ask(i)` while the upstream holds its answer, let go once the upstream was
    asked and all n read the flight on their instance: every duplicate joined before the
    answer came, however slow the machine. With Redis each of the n reads through a reader
    (a leader too), and so does the leading instance's mirror to the Redis stream: n + 1."""
    calls = fake.count(CHAT_PATH)
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(ask(i)) for i in range(n)]
        await wait_until(
            lambda: fake.count(CHAT_PATH) > calls and flight_readers(*proxies) == n + 1, 30.0
        )
    finally:
        fake.release()
    return list(await asyncio.gather(*jobs))


def test_instance_b_hits_what_a_stored_and_restart_keeps_it(
    two: tuple[ProxyServer, ProxyServer],
    start_proxy: Any,
    redis_server: RedisServer,
    fake: FakeOpenAI,
) -> None:
    """B answers HIT for what A stored; a new instance (a restart) still has it."""
    a, b = two
    with sdk(a) as ca, sdk(b) as cb:
        first = ca.chat.completions.create(**CHAT)
        hit = cb.chat.completions.with_raw_response.create(**CHAT)
    assert hit.headers["x-cache-status"] == "HIT" and hit.parse().id == first.id
    c = start_proxy(cache=redis_server.url)
    with sdk(c) as cc:
        again = cc.chat.completions.with_raw_response.create(**CHAT)
    assert again.headers["x-cache-status"] == "HIT" and again.parse().id == first.id
    assert fake.count(CHAT_PATH) == 1


async def test_forty_requests_over_two_instances_one_call(
    two: tuple[ProxyServer, ProxyServer], fake: FakeOpenAI
) -> None:
    """40 identical requests spread over 2 instances, all waiting at once: 1 upstream call,
    1 MISS and 39 COALESCED."""
    a, b = two
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await held_burst(fake, two, 40, lambda i: post_json(urls[i % 2], CHAT))
    assert fake.count(CHAT_PATH) == 1
    assert [s for s, _, _ in results] == [200] * 40
    assert len({b for _, _, b in results}) == 1
    labels = [h["X-Cache-Status"] for _, h, _ in results]
    assert labels.count("MISS") == 1 and labels.count("COALESCED") == 39


async def test_twenty_streams_over_two_instances_one_call(
    two: tuple[ProxyServer, ProxyServer], fake: FakeOpenAI
) -> None:
    """20 concurrent identical streams over 2 instances: 1 call, 20 complete streams."""
    a, b = two
    fake.chunk_delay = 0.03
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await asyncio.gather(*(post_stream(urls[i % 2], STREAM) for i in range(20)))
    assert fake.count(CHAT_PATH) == 1
    bodies = {joined(chunks) for _, _, chunks in results}
    assert len(bodies) == 1 and next(iter(bodies)).endswith(b"data: [DONE]\n\n")


async def test_upstream_error_crosses_instances_uncached(
    two: tuple[ProxyServer, ProxyServer], fake: FakeOpenAI
) -> None:
    """An upstream error reaches the other instance's waiters too, and is not stored."""
    a, b = two
    body = {**CHAT, "model": "fake-error-503"}
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await held_burst(fake, two, 6, lambda i: post_json(urls[i % 2], body))
    assert [s for s, _, _ in results] == [503] * 6 and fake.count(CHAT_PATH) == 1
    status, _, _ = await post_json(urls[1], body)
    assert status == 503 and fake.count(CHAT_PATH) == 2


def test_leader_instance_killed_mid_stream(
    start_proxy: Any, redis_server: RedisServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The leading instance dies mid-stream: exactly one re-fetch, nobody hangs beyond the
    lease plus the wait timeout, and no lease key is left behind."""
    fake.chunk_delay = 0.25  # 8 chunks: about 2 s
    leader, port = spawn_proxy(
        fake.base_url,
        tmp_path / "leader",
        "--cache",
        redis_server.url,
        "--lease-s",
        "1",
        "--secret",
        "test-secret",
    )
    b = start_proxy(cache=redis_server.url, lease_s=1.0)

    async def scenario() -> tuple[tuple[Any, ...], float]:
        first = asyncio.ensure_future(
            post_stream(f"http://127.0.0.1:{port}/v1/chat/completions", STREAM)
        )
        await wait_until(lambda: len(fake.sent) >= 2)
        follower = asyncio.ensure_future(post_stream(b.url + "/v1/chat/completions", STREAM))
        await wait_until(lambda: len(fake.sent) >= 3)
        os.kill(leader.pid, signal.SIGKILL)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(first, follower, return_exceptions=True)
        ended = time.monotonic() - t0
        await wait_until(lambda: fake.count(CHAT_PATH) == 2, within_s=5)
        await wait_until(lambda: len(b.state.flights) == 0, within_s=10)
        return outcomes, ended

    try:
        outcomes, ended = asyncio.run(scenario())
    finally:
        leader.kill()
        leader.wait(10)
    assert all(isinstance(o, Exception | tuple) for o in outcomes)
    assert ended < 1.0 + 30.0
    assert fake.count(CHAT_PATH) == 2  # the original call and exactly one re-fetch
    r = redis.Redis.from_url(redis_server.url)
    assert not [k for k in r.scan_iter(match="*:lease")]
    r.close()
    # The re-fetch filled the cache.
    with sdk(b) as c, c.chat.completions.with_streaming_response.create(**STREAM) as hit:
        assert hit.headers["x-cache-status"] == "HIT"
        assert b"".join(hit.iter_bytes()).endswith(b"data: [DONE]\n\n")


async def test_redis_killed_while_requests_flow(start_proxy: Any, fake: FakeOpenAI) -> None:
    """Redis dies under load: no client request fails, latency stays bounded, one
    store.unavailable line; when Redis is back, caching resumes without a restart."""
    server = start_redis()
    try:
        proxy = start_proxy(cache=server.url + "?timeout=0.2", breaker_s=0.5)
        url = proxy.url + "/v1/chat/completions"

        def body(i: int) -> dict[str, Any]:
            # Repeats before the outage (HITs); new questions after it (no hot copy to serve).
            text = f"q{i % 5}" if i < 20 else f"new {i}"
            return {**CHAT, "messages": [{"role": "user", "content": text}]}

        statuses, slowest = [], 0.0
        with capture_logs() as logs:
            for i in range(60):
                if i == 20:
                    server.proc.kill()
                    server.proc.wait()
                t0 = time.monotonic()
                status, headers, _ = await post_json(url, body(i))
                slowest = max(slowest, time.monotonic() - t0) if i >= 20 else slowest
                statuses.append((status, headers["X-Cache-Status"]))
            async with aiohttp.ClientSession() as s, s.get(proxy.url + "/_proxy/health") as r:
                health = await r.json()
        assert all(s == 200 for s, _ in statuses)
        assert {label for _, label in statuses[:20]} == {"MISS", "HIT"}
        assert {label for _, label in statuses[20:]} == {"BYPASS"}
        assert slowest < 3.0  # Redis times out in 0.2 s: this rules out a hang on it
        assert health["status"] == "degraded"
        assert [e["event"] for e in logs].count("store.unavailable") == 1

        server = start_redis(server.port)

        async def health_status() -> str:
            async with aiohttp.ClientSession() as s, s.get(proxy.url + "/_proxy/health") as r:
                return str((await r.json())["status"])

        # the store probe (every second) closes the breaker once it sees Redis back
        deadline = time.monotonic() + 10
        while await health_status() != "ok":
            assert time.monotonic() < deadline, "health never saw Redis back"
            await asyncio.sleep(0.1)
        _, headers, _ = await post_json(url, body(99))
        assert headers["X-Cache-Status"] == "MISS"  # not BYPASS: caching is back on
        _, headers, _ = await post_json(url, body(99))
        assert headers["X-Cache-Status"] == "HIT"
        back = redis.Redis(port=server.port)
        try:  # written to the restarted Redis too, not only to the hot tier
            await wait_until(lambda: any(back.scan_iter(match="ocp:resp:*")), 5.0)
        finally:
            back.close()
    finally:
        server.stop()


async def test_coalescing_on_redis_cluster(
    start_proxy: Any, redis_cluster: str, fake: FakeOpenAI
) -> None:
    """The cross-instance coalescing test passes against a local Redis Cluster: a held burst
    of answers and one of streams over 2 instances each make 1 upstream call."""
    a = start_proxy(cache=redis_cluster)
    b = start_proxy(cache=redis_cluster)
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await held_burst(fake, (a, b), 20, lambda i: post_json(urls[i % 2], CHAT))
    assert fake.count(CHAT_PATH) == 1 and len({b for _, _, b in results}) == 1
    fake.chunk_delay = 0.02
    streams = await held_burst(fake, (a, b), 10, lambda i: post_stream(urls[i % 2], STREAM))
    assert fake.count(CHAT_PATH) == 2 and len({joined(c) for _, _, c in streams}) == 1
    _status, headers, _ = await post_json(urls[1], CHAT)
    assert headers["X-Cache-Status"] == "HIT"

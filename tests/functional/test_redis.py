"""Redis: one cache and one flight per request across instances; fail open (issue 5)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from structlog.testing import capture_logs

from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, RedisServer, sdk, spawn_proxy, start_redis
from tests.helpers import joined, post_json, post_stream, wait_until

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
    """Two proxy instances sharing one Redis."""
    a = start_proxy(cache=redis_server.url, lease_s=1.0)
    b = start_proxy(cache=redis_server.url, lease_s=1.0)
    yield a, b
    assert_clean(redis_server.url)


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
    """40 concurrent identical requests spread over 2 instances: 1 upstream call."""
    a, b = two
    fake.latency = 0.5
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await asyncio.gather(*(post_json(urls[i % 2], CHAT) for i in range(40)))
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
    fake.latency = 0.3
    body = {**CHAT, "model": "fake-error-503"}
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await asyncio.gather(*(post_json(urls[i % 2], body) for i in range(6)))
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
        assert slowest < 1.0
        assert health["status"] == "degraded"
        assert [e["event"] for e in logs].count("store.unavailable") == 1

        server = start_redis(server.port)
        await asyncio.sleep(0.6)
        labels = []
        for _ in range(3):
            _, headers, _ = await post_json(url, body(99))
            labels.append(headers["X-Cache-Status"])
            await asyncio.sleep(0.1)
        assert labels[-1] == "HIT", labels
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/_proxy/health") as r:
            assert (await r.json())["status"] == "ok"
    finally:
        server.stop()


async def test_coalescing_on_redis_cluster(
    start_proxy: Any, redis_cluster: str, fake: FakeOpenAI
) -> None:
    """The cross-instance coalescing test passes against a local Redis Cluster."""
    a = start_proxy(cache=redis_cluster, lease_s=1.0)
    b = start_proxy(cache=redis_cluster, lease_s=1.0)
    fake.latency = 0.5
    urls = [p.url + "/v1/chat/completions" for p in (a, b)]
    results = await asyncio.gather(*(post_json(urls[i % 2], CHAT) for i in range(20)))
    assert fake.count(CHAT_PATH) == 1 and len({b for _, _, b in results}) == 1
    fake.chunk_delay = 0.02
    streams = await asyncio.gather(*(post_stream(urls[i % 2], STREAM) for i in range(10)))
    assert fake.count(CHAT_PATH) == 2 and len({joined(c) for _, _, c in streams}) == 1
    _status, headers, _ = await post_json(urls[1], CHAT)
    assert headers["X-Cache-Status"] == "HIT"

"""Resilience at the edges: Redis Cluster cold starts and reshards, a full Redis, clients that
never read, idle and half-sent connections, a hung S3, a capped embedded store."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from proxy.controls import parse_cache_control
from proxy.models import CachedResponse
from proxy.stores.redis import RedisStore
from proxy.stores.sqlite import SQLiteStore
from proxy.testing import FakeOpenAI
from tests.conftest import BackgroundLoop, free_port, spawn_proxy, start_redis
from tests.helpers import Proc, body_of, flight_readers, header, post, raw, status_of, wait_until

CHAT = "/v1/chat/completions"


def chat(prompt: str) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})


AUTH = {"Authorization": "Bearer sk-a", "Content-Type": "application/json"}


async def test_cluster_cold_start_many_first_calls_at_once(redis_cluster: str) -> None:
    """A cluster client that has never been used, hit by 100 coroutines at once: no failure
    (redis-py's cluster client breaks when they all initialise it together)."""
    store = RedisStore.from_url(redis_cluster)
    entry = CachedResponse(200, (), b"x", time.time())
    try:
        await asyncio.gather(*(store.set(f"k{i}", entry, 60) for i in range(100)))
        got = await asyncio.gather(*(store.get(f"k{i}") for i in range(100)))
        assert all(g is not None and g.body == b"x" for g in got)
    finally:
        await store.aclose()


async def _load(urls: list[str], n: int, prompt_of: Callable[[int], str]) -> list[int]:
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            async with s.post(
                urls[i % len(urls)] + CHAT, data=chat(prompt_of(i)), headers=AUTH
            ) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_cluster_cold_start_under_load(
    start_proxy: Any, redis_cluster: str, fake: FakeOpenAI
) -> None:
    """Two fresh instances on a fresh cluster, a burst at once (held at the upstream until
    every request joined a flight): no 5xx, one upstream call per distinct prompt."""
    # the default 5 s lease: a short one could run out while a loaded machine stalls a
    # leader, and a follower on the other instance would fetch again
    a = start_proxy(cache=redis_cluster)
    b = start_proxy(cache=redis_cluster)
    fake.hold()
    try:
        load = asyncio.ensure_future(_load([a.url, b.url], 60, lambda i: f"p{i % 3}"))
        # with Redis each request reads its flight through a reader, and so does each of the
        # 3 leaders' mirrors to the Redis stream: 63
        await wait_until(lambda: fake.count(CHAT) == 3 and flight_readers(a, b) == 63, 30.0)
    finally:
        fake.release()
    statuses = await load
    assert set(statuses) == {200}
    assert fake.count(CHAT) == 3


def _node_ids(port: int) -> dict[str, tuple[int, str]]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "nodes"], capture_output=True, text=True
    ).stdout
    nodes = {}
    for line in out.splitlines():
        parts = line.split()
        nodes[parts[0]] = (int(parts[1].split(":")[1].split("@")[0]), line)
    return nodes


async def test_slot_migration_under_load(
    start_proxy: Any, redis_cluster: str, fake: FakeOpenAI
) -> None:
    """Moving slots between masters while requests flow: no 5xx, and HITs after."""
    a = start_proxy(cache=redis_cluster, hot_cache_mb=0)
    port = int(redis_cluster.rsplit(":", 1)[1])
    await _load([a.url], 30, lambda i: f"m{i}")  # entries spread over the slots
    ids = list(_node_ids(port))
    reshard = subprocess.Popen(  # noqa: ASYNC220 - started, then polled between bursts
        [
            "redis-cli",
            "--cluster",
            "reshard",
            f"127.0.0.1:{port}",
            "--cluster-from",
            ids[0],
            "--cluster-to",
            ids[1],
            "--cluster-slots",
            "3000",
            "--cluster-yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statuses: list[int] = []
    while reshard.poll() is None:
        statuses += await _load([a.url], 30, lambda i: f"m{i}")
    assert reshard.returncode == 0
    assert statuses and all(s < 500 for s in statuses)
    await asyncio.sleep(a.settings.breaker_s + 0.5)  # any breaker a redirect storm opened
    async with aiohttp.ClientSession() as s:
        for i in range(30):
            async with s.post(a.url + CHAT, data=chat(f"m{i}"), headers=AUTH) as r:
                await r.read()
                assert r.headers["X-Cache-Status"] == "HIT"


def test_a_full_redis_skips_writes_and_keeps_serving_reads(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """Redis at maxmemory with noeviction: one tenant's failed writes are skipped and
    counted, and another tenant's HITs keep coming from Redis (no breaker)."""
    server = start_redis(None, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    try:
        proxy = start_proxy(cache=server.url, hot_cache_mb=0)
        url = f"127.0.0.1:{proxy.url.rsplit(':', 1)[1]}"
        port = int(url.split(":")[1])
        b_headers = {"Authorization": "Bearer sk-b", "Content-Type": "application/json"}
        for i in range(3):
            post(port, chat(f"b{i}"), b_headers)
        # Fill Redis to its last bytes; the filling connection stays open (closing it would
        # free its buffers, room for a few more writes).
        r = redis.Redis(port=server.port)
        n = iter(range(10**9))

        def fill(*sizes: int) -> None:  # up to the limit (Redis's used memory drifts below it)
            for size in sizes:
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    for _ in range(100_000):
                        r.set(f"junk:{next(n)}", os.urandom(size))

        fill(64 * 1024, 4096, 256, 64)
        for i in range(10):
            fill(64)
            assert header(post(port, chat(f"a{i}"), AUTH), "X-Cache-Status") == "MISS"
            hit = post(port, chat(f"b{i % 3}"), b_headers)
            assert header(hit, "X-Cache-Status") == "HIT"
        r.close()
        assert proxy.state.cache.write_errors >= 8 and proxy.state.cache.healthy
        stats = orjson.loads(body_of(raw(port, b"GET /_proxy/stats HTTP/1.1\r\nHost: x\r\n\r\n")))
        assert stats["store"]["write_errors"] == proxy.state.cache.write_errors
    finally:
        server.stop()


def test_evicting_redis_policy_is_named_in_health(start_proxy: Any) -> None:
    """A Redis whose maxmemory-policy evicts keys without a TTL is a warning in health."""
    server = start_redis(None, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    try:
        proxy = start_proxy(cache=server.url)
        port = int(proxy.url.rsplit(":", 1)[1])
        health = orjson.loads(body_of(raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\n\r\n")))
        assert any("allkeys-lru" in w for w in health["warnings"])
    finally:
        server.stop()


def test_a_client_that_never_reads_pins_no_more_than_a_window(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A 100 MB answer to a client that reads nothing: the proxy's memory stays bounded (the
    flight keeps --max-record-mb at most) and the client is dropped after the write timeout."""
    fake.speech_mb = 100
    p = Proc(
        fake.base_url,
        tmp_path / "d",
        "--max-record-mb",
        "8",
        "--write-timeout-s",
        "3",
        "--cache",
        "memory://",
    )
    try:
        before = p.rss_kb()
        body = orjson.dumps({"model": "tts-1", "input": "a long read", "voice": "alloy"})
        head = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(head + body)
        deadline = time.monotonic() + 20
        peak = 0
        while time.monotonic() < deadline and fake.count("/v1/audio/speech") == 0:
            time.sleep(0.1)
        time.sleep(3)  # the upstream sends everything; the proxy reads it all
        peak = max(peak, p.rss_kb() - before)
        s.settimeout(10)
        t_drain = time.monotonic()
        got = 0
        closed_at = None
        try:
            while True:  # drain: the proxy must have cut us off after the write timeout
                data = s.recv(1 << 20)
                got += len(data)
                if not data:
                    closed_at = time.monotonic()
                    break
        except (ConnectionResetError, TimeoutError):
            closed_at = time.monotonic()
        s.close()
        assert peak < 60 * 1024, peak  # 100 MB went through
        assert closed_at is not None
        assert closed_at - t_drain < 15
        out, _ = p.stop()
        done = [orjson.loads(ln) for ln in out.splitlines() if b"audio/speech" in ln]
        assert done and done[0]["client_dropped"] is True
        assert got < 50 * 1024 * 1024  # cut off, not relayed whole
    finally:
        p.stop()


def test_partial_headers_and_idle_connections_are_closed_in_time(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """50 connections that send half a request head are closed after --header-timeout-s;
    an idle keep-alive after --keepalive-timeout-s; other clients are served meanwhile."""
    p = Proc(fake.base_url, tmp_path / "d", "--header-timeout-s", "1", "--keepalive-timeout-s", "2")
    try:
        socks = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", p.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthoriz")
            s.settimeout(5)
            socks.append(s)
        answer = raw(p.port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 200
        t0 = time.monotonic()
        for s in socks:
            assert s.recv(100) == b""  # closed by the proxy
            s.close()
        assert time.monotonic() - t0 < 4  # (each had 1 s from its connect: only a hang fails)
        idle = socket.create_connection(("127.0.0.1", p.port))
        idle.settimeout(10)
        # aiohttp closes a connection idle for keepalive_timeout after its last answer was
        # written: taken before the request is sent, t1 is earlier still, so the close comes
        # at least 2 s after it however slow the machine (1.9: timer slack)
        t1 = time.monotonic()
        idle.sendall(b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = idle.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        while idle.recv(65536):
            pass
        idle_s = time.monotonic() - t1
        assert 1.9 < idle_s < 8, idle_s
        idle.close()
        limits = Path(f"/proc/{p.proc.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        soft, hard = row.split()[3:5]
        assert soft == hard  # raised to the hard limit at start-up
    finally:
        p.stop()


def test_cache_control_lines_form_one_list_and_invalid_values_are_ignored(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """max-age on one line and no-store on the next: not stored; max-age=-1 or nan is
    ignored (a HIT, the entry kept), not taken as 0."""
    assert parse_cache_control("max-age=3600,no-store", None).mode.value == "bypass"
    for bad in ("max-age=-1", "max-age=nan", "max-age=1.5", "max-age="):
        assert parse_cache_control(bad, None).max_age is None
    assert parse_cache_control("max-age=99999999999999999999", None).max_age == 2**31
    proxy = start_proxy()
    port = int(proxy.url.rsplit(":", 1)[1])
    lines = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
        "Content-Type: application/json\r\nCache-Control: max-age=3600\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n"
    )
    body = chat("two lines")
    first = raw(port, f"{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert header(first, "X-Cache-Status") == "BYPASS"
    assert header(post(port, body, AUTH), "X-Cache-Status") == "MISS"  # nothing was stored
    for bad in ("max-age=-1", "max-age=nan"):
        again = post(port, body, {**AUTH, "Cache-Control": bad})
        assert header(again, "X-Cache-Status") == "HIT"
    assert fake.count(CHAT) == 2


async def test_capped_sqlite_store_stays_under_its_cap(tmp_path: Path) -> None:
    """Incompressible answers past the cap: the least recently used go, the total stays
    under the cap, the file stops growing, and expired rows are swept in batches."""
    cap = 2 * 1024 * 1024
    store = SQLiteStore(tmp_path / "c.db", max_bytes=cap)
    try:
        await store.set("keep", CachedResponse(200, (), os.urandom(100_000), time.time()), 3600)
        for i in range(100):
            await store.set(
                f"k{i}", CachedResponse(200, (), os.urandom(100_000), time.time()), 3600
            )
            if i % 10 == 0:
                assert await store.get("keep") is not None or i > 0
        assert await store.total_bytes() <= cap
        assert (tmp_path / "c.db").stat().st_size < 4 * cap
        assert await store.get("k99") is not None and await store.get("k0") is None
        assert store.evicted > 0
        for i in range(500):
            await store.set(f"old{i}", CachedResponse(200, (), b"x", time.time()), 0.01)
        await asyncio.sleep(0.05)
        assert await store.sweep() == 500
        assert await store.get("k99") is not None
    finally:
        await store.aclose()


def test_a_hung_s3_is_bounded_and_duplicates_wait_for_the_busy_leader(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An S3 endpoint that accepts and never answers: the image answer comes back within
    --image-timeout-s (original URL, not stored), and a duplicate that arrived meanwhile
    waited for that leader instead of paying for a second generation."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hole.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nroute = "/v1/images/generations"\nlock_timeout_s = 0.5\n')
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        proxy = start_proxy(
            images="s3://bucket/p",
            s3_endpoint_url=f"http://127.0.0.1:{hole.getsockname()[1]}",
            image_source_hosts=fake.netloc,
            image_timeout_s=2.0,
            rules=rules,
        )
        port = int(proxy.url.rsplit(":", 1)[1])
        body = orjson.dumps({"prompt": "hung s3", "response_format": "url"})
        results: list[tuple[float, bytes]] = []

        def one() -> None:
            t0 = time.monotonic()
            results.append(
                (time.monotonic() - t0, post(port, body, AUTH, "/v1/images/generations"))
            )
            results[-1] = (time.monotonic() - t0, results[-1][1])

        threads = [threading.Thread(target=one) for _ in range(2)]
        threads[0].start()
        time.sleep(0.3)
        threads[1].start()
        for t in threads:
            t.join(30)
        assert len(results) == 2
        for took, answer in results:
            assert status_of(answer) == 200 and took < 6
            assert orjson.loads(body_of(answer))["data"][0]["url"].startswith(fake.base_url)
        assert fake.count("/v1/images/generations") == 1
    finally:
        stop.set()
        acceptor.join(5)
        for c in accepted:
            c.close()
        hole.close()


def test_private_upstream_ca(tmp_path: Path, bg: BackgroundLoop) -> None:
    """--upstream-ca-file trusts a private CA: without it the TLS upstream is a 502."""
    trustme = pytest.importorskip("trustme")
    from aiohttp import web

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ssl_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(ssl_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_ctx).start()

    bg.run(start())
    try:
        upstream = f"https://127.0.0.1:{port}"
        for flags, expected in (((), 502), (("--upstream-ca-file", str(ca_file)), 200)):
            proc, pport = spawn_proxy(upstream, tmp_path / f"d{expected}", *flags)
            try:
                got = raw(pport, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert status_of(got) == expected
            finally:
                proc.terminate()
                proc.wait(20)
    finally:
        bg.run(runner.cleanup())

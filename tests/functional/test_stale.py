"""stale-if-error (RFC 5861): an expired answer covers an upstream failure, never a 4xx."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from structlog.testing import capture_logs

from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, RedisServer, free_port
from tests.helpers import (
    body_of,
    eventually,
    flight_readers,
    header,
    post,
    raw,
    status_of,
    wait_until,
)

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-a", "Content-Type": "application/json"}
ERROR = orjson.dumps(
    {"error": {"message": "down", "type": "server_error", "param": None, "code": None}}
)


def chat(prompt: str) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})


def rules(tmp_path: Path, stale: float | None = 60.0) -> Path:
    path = tmp_path / "rules.toml"
    extra = f"stale_if_error_s = {stale}\n" if stale is not None else ""
    path.write_text(f'[[rule]]\nroute = "/v1/chat/completions"\nttl_s = 1\n{extra}')
    return path


def port_of(server: ProxyServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_an_expired_answer_covers_each_failing_status(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, status: int
) -> None:
    """Past ttl_s, a failing upstream answer is replaced by the stored one (STALE, Age,
    Cache-Status fwd-status); the next healthy answer replaces the entry."""
    proxy = start_proxy(rules=rules(tmp_path))
    port = port_of(proxy)
    first = post(port, chat("q"), AUTH)
    assert header(first, "X-Cache-Status") == "MISS"
    time.sleep(1.1)
    fake.errors = [(status, ERROR)]
    with capture_logs() as logs:
        stale = post(port, chat("q"), AUTH)
    assert status_of(stale) == 200 and header(stale, "X-Cache-Status") == "STALE"
    assert body_of(stale) == body_of(first)
    assert int(header(stale, "Age") or 0) >= 1
    assert header(stale, "Cache-Status") == f"openai-cache-proxy; fwd=stale; fwd-status={status}"
    done = [e for e in logs if e["event"] == "request.done"]
    assert done[-1]["cache"] == "stale" and done[-1]["upstream_status"] == status
    assert done[-1]["saved_usd"] > 0
    fresh = post(port, chat("q"), AUTH)  # healthy again: a new answer replaces the entry
    assert header(fresh, "X-Cache-Status") == "MISS"
    assert header(post(port, chat("q"), AUTH), "X-Cache-Status") == "HIT"
    stats = orjson.loads(body_of(raw(port, b"GET /_proxy/stats HTTP/1.1\r\nHost: x\r\n\r\n")))
    assert stats["stale"] == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_4xx_is_never_covered(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, status: int
) -> None:
    """A revoked key (401), a bad request (400)... pass through as they came."""
    proxy = start_proxy(rules=rules(tmp_path))
    port = port_of(proxy)
    post(port, chat("q"), AUTH)
    time.sleep(1.1)
    fake.errors = [(status, ERROR)]
    answer = post(port, chat("q"), AUTH)
    assert status_of(answer) == status and header(answer, "X-Cache-Status") == "MISS"


def test_without_the_option_or_the_directive_errors_pass_through(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Without a stale rule option or a stale-if-error directive, an upstream error after expiry
    passes through to the client."""
    proxy = start_proxy(rules=rules(tmp_path, stale=None))
    port = port_of(proxy)
    post(port, chat("q"), AUTH)
    time.sleep(1.1)
    fake.errors = [(503, ERROR)]
    assert status_of(post(port, chat("q"), AUTH)) == 503


def test_the_request_directive_opts_in_on_any_rule(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Cache-Control: stale-if-error=N on a rule without the option: the answer it stored is
    kept N s past its ttl and covers a failure; a directive of 0 s does not."""
    proxy = start_proxy(rules=rules(tmp_path, stale=None))
    port = port_of(proxy)
    asked = {**AUTH, "Cache-Control": "stale-if-error=60"}
    first = post(port, chat("q"), asked)
    time.sleep(1.1)
    fake.errors = [(503, ERROR)]
    assert status_of(post(port, chat("q"), {**AUTH, "Cache-Control": "stale-if-error=0"})) == 503
    fake.errors = [(503, ERROR)]
    stale = post(port, chat("q"), asked)
    assert header(stale, "X-Cache-Status") == "STALE" and body_of(stale) == body_of(first)


async def test_waiters_on_the_failed_flight_get_the_stale_answer(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Five identical requests while the upstream fails (held until the four duplicates
    joined the leader's flight): one call, five STALE answers."""
    proxy = start_proxy(rules=rules(tmp_path))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + CHAT, data=chat("q"), headers=AUTH) as r:
            original = await r.read()
        await asyncio.sleep(1.1)
        fake.errors = [(500, ERROR)]
        calls = fake.count(CHAT)

        async def one() -> tuple[str, bytes]:
            async with s.post(proxy.url + CHAT, data=chat("q"), headers=AUTH) as r:
                return r.headers["X-Cache-Status"], await r.read()

        fake.hold()
        try:
            jobs = [asyncio.ensure_future(one()) for _ in range(5)]
            # the leader reads its JSON answer itself: the 4 others read the flight
            await wait_until(
                lambda: fake.count(CHAT) == calls + 1 and flight_readers(proxy) == 4, 30.0
            )
        finally:
            fake.release()
        answers = await asyncio.gather(*jobs)
    assert fake.count(CHAT) == calls + 1
    assert {a[0] for a in answers} == {"STALE"} and {a[1] for a in answers} == {original}


def test_an_unreachable_upstream_on_a_second_instance(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two instances on one Redis: B, whose upstream is down, serves A's expired answer as
    STALE (Cache-Status says the network failed); without stale-if-error it would be a 502."""
    rule_file = rules(tmp_path)
    a = start_proxy(cache=redis_server.url, rules=rule_file)
    b = start_proxy(
        cache=redis_server.url,
        rules=rule_file,
        upstream=f"http://127.0.0.1:{free_port()}",
        upstream_connect_timeout_s=1.0,
    )
    first = post(port_of(a), chat("shared"), AUTH)
    assert header(first, "X-Cache-Status") == "MISS"
    time.sleep(1.1)
    stale = post(port_of(b), chat("shared"), AUTH)
    assert status_of(stale) == 200 and header(stale, "X-Cache-Status") == "STALE"
    assert body_of(stale) == body_of(first)
    assert header(stale, "Cache-Status") == (
        "openai-cache-proxy; fwd=stale; detail=upstream-unreachable"
    )
    # B lets go of its lease once its flight is done (a request before that would follow
    # B's flight and share its failure); within 3 s, less than a lease left to expire lasts
    r = redis.Redis.from_url(redis_server.url)
    try:
        eventually(lambda: not any(r.scan_iter(match="*:lease")), 3.0)
    finally:
        r.close()
    fresh = post(port_of(a), chat("shared"), AUTH)  # A's upstream is fine: replaced
    assert header(fresh, "X-Cache-Status") == "MISS"

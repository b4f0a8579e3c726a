"""Every path that serves a stored answer gives the one asked for, in the form asked for;
every purge removes all it names (issue 24: stale, idempotency, purge, damaged entries)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from structlog.testing import capture_logs

from proxy.models import CachedResponse
from proxy.testing import FakeOpenAI
from tests.conftest import ROOT, BackgroundLoop, ProxyServer, RedisServer, sdk
from tests.functional.test_operations import TOKEN, purge_http, tenant_of
from tests.helpers import body_of, header, post, status_of, wait_until

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer sk-a", "Content-Type": "application/json"}
ERROR = orjson.dumps(
    {"error": {"message": "down", "type": "server_error", "param": None, "code": None}}
)
PROMPT: list[Any] = [{"role": "user", "content": "every form"}]


def port_of(server: ProxyServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def stale_rules(tmp_path: Path, route: str = CHAT) -> Any:
    path = tmp_path / "rules.toml"
    path.write_text(f'[[rule]]\nroute = "{route}"\nttl_s = 1\nstale_if_error_s = 60\n')
    return path


def chat_body(stream: bool, prompt: str = "q", model: str = "gpt-4o-mini", **kw: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps({**body, **kw})


# -- 1. STALE goes through the same conversion as a HIT ------------------------------------------
def test_a_stale_stream_serves_a_json_client_as_json(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A stored stream, expired, covers a 503 for a non-streamed SDK call: a chat.completion
    object (not SSE chunks) with the stream's text and usage, labelled STALE."""
    proxy = start_proxy(rules=stale_rules(tmp_path))
    with sdk(proxy) as c:
        with c.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        ) as resp:
            assert resp.headers["x-cache-status"] == "MISS"
            text = "".join(ch.choices[0].delta.content or "" for ch in resp.parse() if ch.choices)
        time.sleep(1.1)
        fake.errors = [(503, ERROR)]
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=PROMPT)
    assert raw.headers["x-cache-status"] == "STALE"
    assert raw.headers["content-type"].startswith("application/json")
    assert "fwd-status=503" in raw.headers["cache-status"]
    got = raw.parse()
    assert got.choices[0].message.content == text
    assert got.usage is not None
    assert got.usage.total_tokens > 0


def test_a_stale_json_answer_serves_a_streaming_client_as_a_stream(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A stored JSON answer, expired, covers a 502 for a streamed request: SSE chunks ending
    in [DONE], labelled STALE."""
    proxy = start_proxy(rules=stale_rules(tmp_path))
    port = port_of(proxy)
    first = post(port, chat_body(False), AUTH)
    assert header(first, "X-Cache-Status") == "MISS"
    time.sleep(1.1)
    fake.errors = [(502, ERROR)]
    answer = post(port, chat_body(True), AUTH)
    assert status_of(answer) == 200 and header(answer, "X-Cache-Status") == "STALE"
    assert (header(answer, "Content-Type") or "").startswith("text/event-stream")
    body = body_of(answer)
    assert body.rstrip().endswith(b"data: [DONE]")
    text = orjson.loads(body_of(first))["choices"][0]["message"]["content"]
    assert text.split(":")[0].encode() in body


def test_a_stale_image_answer_links_to_this_proxy(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An expired image answer that covers a 503 carries links under this proxy's address
    (never the placeholder base it is stored with), which serve the image."""
    route = "/v1/images/generations"
    proxy = start_proxy(rules=stale_rules(tmp_path, route), image_source_hosts=fake.netloc)
    with sdk(proxy) as c:
        first = c.images.generate(prompt="stale cat", model="dall-e-2", response_format="url")
        time.sleep(1.1)
        fake.errors = [(503, ERROR)]
        raw = c.images.with_raw_response.generate(
            prompt="stale cat", model="dall-e-2", response_format="url"
        )
    assert raw.headers["x-cache-status"] == "STALE"
    assert first.data is not None
    got = raw.parse().data
    assert got is not None and got[0].url == first.data[0].url
    assert got[0].url is not None and got[0].url.startswith(proxy.url + "/_proxy/images/")
    assert b"openai-cache-proxy.invalid" not in raw.http_response.content


# -- 3. Idempotency-Key does not depend on `stream` -----------------------------------------------
async def test_one_idempotency_key_one_call_in_every_form(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """Two concurrent requests with one Idempotency-Key that differ only in `stream` make
    one upstream call, each gets its own form, and a later retry of either is not a 422."""
    proxy = start_proxy()
    fake.latency = 0.6
    headers = {**AUTH, "Idempotency-Key": "order-7"}
    port = port_of(proxy)
    loop = asyncio.get_running_loop()
    a, b = await asyncio.gather(
        loop.run_in_executor(None, post, port, chat_body(False, "idem"), headers),
        loop.run_in_executor(None, post, port, chat_body(True, "idem"), headers),
    )
    assert fake.count(CHAT) == 1
    assert status_of(a) == status_of(b) == 200
    assert (header(a, "Content-Type") or "").startswith("application/json")
    assert (header(b, "Content-Type") or "").startswith("text/event-stream")
    text = orjson.loads(body_of(a))["choices"][0]["message"]["content"]
    assert text.split(":")[0].encode() in body_of(b)
    fake.latency = 0.0
    for stream in (False, True):
        retry = await loop.run_in_executor(None, post, port, chat_body(stream, "idem"), headers)
        assert status_of(retry) == 200, body_of(retry)
    assert fake.count(CHAT) == 1
    other = await loop.run_in_executor(None, post, port, chat_body(False, "other"), headers)
    assert status_of(other) == 422  # another request under the key is still refused


def test_an_idempotency_key_stream_without_usage_is_one_call_for_a_json_retry(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A key first used with a chat stream that asked no usage, then retried as JSON: no
    second upstream call (one key, one bill); the JSON carries the stream's answer, with
    `usage: null`, and the SDK parses it."""
    client = sdk(proxy, key="sk-a")
    key = {"Idempotency-Key": "order-43"}
    messages: Any = [{"role": "user", "content": "book one ticket"}]
    chunks: list[Any] = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, extra_headers=key
        )
    )
    retry = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, extra_headers=key
    )
    completion = retry.parse()
    assert fake.count(CHAT) == 1 and retry.headers["x-cache-status"] == "HIT"
    assert completion.id == chunks[0].id and completion.usage is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert completion.choices[0].message.content == text


def test_one_idempotency_key_across_instances_in_every_form(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer
) -> None:
    """On two instances sharing Redis, the same key led as a stream on A is one call for a
    non-streamed retry on B, which gets JSON, not a 422."""
    a = start_proxy(cache=redis_server.url, lease_s=2.0)
    b = start_proxy(cache=redis_server.url, lease_s=2.0)
    fake.latency = 0.8
    headers = {**AUTH, "Idempotency-Key": "order-x"}

    async def both() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        first = loop.run_in_executor(None, post, port_of(a), chat_body(True, "x"), headers)
        await asyncio.sleep(0.3)
        second = loop.run_in_executor(None, post, port_of(b), chat_body(False, "x"), headers)
        return await first, await second

    sa, jb = asyncio.run(both())
    assert fake.count(CHAT) == 1
    assert (header(sa, "Content-Type") or "").startswith("text/event-stream")
    assert status_of(jb) == 200, body_of(jb)
    assert orjson.loads(body_of(jb))["object"] == "chat.completion"


# -- 4. Purge removes everything it names ---------------------------------------------------
def test_a_long_model_name_is_purged_by_its_full_name(start_proxy: Any, fake: FakeOpenAI) -> None:
    """A model name longer than the label kept in logs is purged by the name the client sent
    (and a name sharing its first 95 characters is kept)."""
    proxy = start_proxy(admin_token=TOKEN)
    port = port_of(proxy)
    long_a, long_b = "ft:" + "m" * 200 + ":a", "ft:" + "m" * 200 + ":b"
    for model in (long_a, long_b):
        assert header(post(port, chat_body(False, model=model), AUTH), "X-Cache-Status") == "MISS"
    assert purge_http(port, {"model": long_a}) == (200, {"purged": 1})
    assert header(post(port, chat_body(False, model=long_a), AUTH), "X-Cache-Status") == "MISS"
    assert header(post(port, chat_body(False, model=long_b), AUTH), "X-Cache-Status") == "HIT"


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_tenant_purge_takes_its_idempotency_entries(
    start_proxy: Any, fake: FakeOpenAI, store: str, redis_server: RedisServer
) -> None:
    """After a purge of a tenant, its Idempotency-Key retries go upstream again; another
    tenant's are kept."""
    cache = "memory://" if store == "memory" else redis_server.url
    proxy = start_proxy(admin_token=TOKEN, cache=cache, hot_cache_mb=0)
    port = port_of(proxy)
    other = {**AUTH, "Authorization": "Bearer sk-b", "Idempotency-Key": "k"}
    mine = {**AUTH, "Idempotency-Key": "k"}
    for headers in (mine, other):
        post(port, chat_body(False, "i", temperature=0), headers)
    assert fake.count(CHAT) == 2
    status, got = purge_http(port, {"tenant": tenant_of(port, "sk-a")})
    assert (status, got) == (200, {"purged": 1})  # its Idempotency-Key entry
    for headers in (mine, other):
        post(port, chat_body(False, "i", temperature=0), headers)
    assert fake.count(CHAT) == 3  # sk-a's retry went upstream again, sk-b's was kept


async def purge_mid_fill(fake: FakeOpenAI, fill_port: int, purge_port: int, body: bytes) -> None:
    """Purge gpt-4o-mini through `purge_port` while the upstream holds the answer to `body`,
    asked through `fill_port`: the fill has begun, by the upstream's own count, before the purge
    and ends after it (no sleep decides the order)."""
    loop = asyncio.get_running_loop()
    fake.hold()
    try:
        filling = loop.run_in_executor(None, post, fill_port, body, AUTH)
        await wait_until(lambda: fake.count(CHAT) == 1, within_s=30.0)
        purged = await loop.run_in_executor(None, purge_http, purge_port, {"model": "gpt-4o-mini"})
        assert purged == (200, {"purged": 0})
    finally:
        fake.release()
    assert header(await filling, "X-Cache-Status") == "MISS"


async def test_a_fill_begun_before_a_purge_is_not_stored(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """A flight still filling when a purge names its key does not store its answer after
    the purge: the next request is a MISS."""
    proxy = start_proxy(admin_token=TOKEN)
    port = port_of(proxy)
    loop = asyncio.get_running_loop()
    await purge_mid_fill(fake, port, port, chat_body(False, "during"))
    again = await loop.run_in_executor(None, post, port, chat_body(False, "during"), AUTH)
    assert header(again, "X-Cache-Status") == "MISS"
    assert fake.count(CHAT) == 2


async def test_a_fill_on_another_instance_begun_before_a_purge_is_not_stored(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer
) -> None:
    """Two instances on one Redis: a purge through A stops a fill already under way on B from
    storing its answer afterwards."""
    a = start_proxy(cache=redis_server.url, admin_token=TOKEN, hot_cache_mb=0)
    b = start_proxy(cache=redis_server.url, admin_token=TOKEN, hot_cache_mb=0)
    loop = asyncio.get_running_loop()
    body = chat_body(False, "elsewhere")
    await purge_mid_fill(fake, port_of(b), port_of(a), body)
    again = await loop.run_in_executor(None, post, port_of(b), body, AUTH)
    assert header(again, "X-Cache-Status") == "MISS"  # the purged fill was not stored
    assert fake.count(CHAT) == 2
    # B lets its lease go once its answer is stored (a request before that follows B)
    with redis.Redis(port=redis_server.port) as r:
        await wait_until(lambda: not any(r.scan_iter(match="*:lease")), within_s=3.0)
    other = await loop.run_in_executor(None, post, port_of(a), body, AUTH)
    assert header(other, "X-Cache-Status") == "HIT"  # an answer asked after the purge is
    assert fake.count(CHAT) == 2


async def test_a_fill_on_another_process_of_one_sqlite_file_is_kept_out_by_a_purge(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Two instances on one SQLite file: a purge through A keeps a fill already under way on
    B out of the file, so A (reading the file) still finds nothing afterwards."""
    cache = f"sqlite:///{tmp_path / 'shared.db'}"
    a = start_proxy(cache=cache, admin_token=TOKEN, hot_cache_mb=0)
    b = start_proxy(cache=cache, admin_token=TOKEN, hot_cache_mb=0)
    loop = asyncio.get_running_loop()
    body = chat_body(False, "one file")
    await purge_mid_fill(fake, port_of(b), port_of(a), body)
    await asyncio.sleep(0.5)  # B's batch is written, and A's key filter has read the file
    again = await loop.run_in_executor(None, post, port_of(a), body, AUTH)
    assert header(again, "X-Cache-Status") == "MISS"  # the purged fill was not stored
    assert fake.count(CHAT) == 2


def test_purge_on_redis_cluster(start_proxy: Any, fake: FakeOpenAI, redis_cluster: str) -> None:
    """On a Redis Cluster a purge removes the entries it names (spread over the masters)
    and they are MISSes afterwards."""
    proxy = start_proxy(cache=redis_cluster, admin_token=TOKEN, hot_cache_mb=0)
    port = port_of(proxy)
    headers = {**AUTH, "X-Cache-Namespace": "cl"}
    for i in range(12):
        assert header(post(port, chat_body(False, f"c{i}"), headers), "X-Cache-Status") == "MISS"
    assert header(post(port, chat_body(False, "c0"), headers), "X-Cache-Status") == "HIT"
    assert purge_http(port, {"namespace": "cl"}) == (200, {"purged": 12})
    for i in range(12):
        assert header(post(port, chat_body(False, f"c{i}"), headers), "X-Cache-Status") == "MISS"


# -- 6. A damaged entry never breaks a different form --------------------------------------
@pytest.mark.parametrize(
    "damage",
    [
        b'data: {"object":"chat.completion.chunk","id":"x","choices":[{"index":[0]}]}\n\n',
        b'data: {"object":"chat.completion.chunk","id":"x","choices":"abc"}\n\n',
        b'data: {"object":"chat.completion.chunk","id":"x","choices":[{"index":0,'
        b'"delta":{"content":5},"logprobs":{"content":"x"}}]}\n\ndata: [DONE]\n\n',
        b"data: \xff\xfe{not json\n\n",
        b"",
    ],
)
def test_a_damaged_stored_stream_is_a_miss_that_deletes_it(
    proxy: ProxyServer, fake: FakeOpenAI, bg: BackgroundLoop, damage: bytes
) -> None:
    """A stored stream whose events cannot be assembled, asked for as JSON, is a MISS (never a
    500 of the proxy's) and the damaged entry is deleted, even when the new answer is not
    stored; then the SDK gets a whole chat.completion."""
    port = port_of(proxy)
    stream = chat_body(True, "damaged")
    assert header(post(port, stream, AUTH), "X-Cache-Status") == "MISS"
    cache = proxy.state.cache
    store: Any = cache.store
    ((key, (_, entry)),) = list(store._items.items())
    damaged = dataclasses.replace(entry, body=damage, chunk_ends=(), chunk_ms=())
    assert isinstance(damaged, CachedResponse)
    bg.run(cache.set(key, damaged, 60))
    fake.errors = [(429, ERROR)]  # the refetch is not stored: the delete is what empties it
    with capture_logs() as logs:
        answer = post(port, chat_body(False, "damaged"), AUTH)
    assert status_of(answer) == 429 and header(answer, "X-Cache-Status") == "MISS"
    assert orjson.loads(body_of(answer)) == orjson.loads(ERROR)  # the upstream's, as it came
    done = [e for e in logs if e["event"] == "request.done"]
    assert "twin_error" in done[-1]
    assert key not in store._items
    with sdk(proxy) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "damaged"}]
        )
    assert raw.headers["x-cache-status"] == "MISS" and raw.parse().choices[0].message.content
    assert fake.count(CHAT) == 3


# -- 5. Large bodies never stall other clients ---------------------------------------------
ATTACKER = """
import sys
from bench.large_bodies_bench import body, send
port, k = int(sys.argv[1]), sys.argv[2].encode()
template, n = body(15, 0), 0
while True:
    n += 1
    send(port, template.replace(b'"big 0"', b'"big %s-%d"' % (k, n), 1))
"""


def test_health_answers_while_15_mb_bodies_are_parsed(tmp_path: Path) -> None:
    """While two processes keep sending new 15 MB nested-array JSON bodies (each takes a
    JSON parser about a second here), /_proxy/health answers at once: the bodies are parsed
    in worker processes, not on (or beside, holding the GIL of) the event loop, which would
    stall it once per body (bench/large_bodies_bench.py measures the p99 with four clients)."""
    from bench.common import fake_upstream
    from tests.helpers import Proc, raw

    with fake_upstream(latency=0.0) as up:
        p = Proc(up, tmp_path / "d", "--max-body-mb", "64")
        attackers = [
            subprocess.Popen([sys.executable, "-c", ATTACKER, str(p.port), str(k)], cwd=ROOT)
            for k in range(2)
        ]
        took: list[float] = []
        try:
            time.sleep(2.0)
            end = time.monotonic() + 6.0  # several parses of each attacker's bodies
            while time.monotonic() < end:
                t0 = time.monotonic()
                answer = raw(
                    p.port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                took.append(time.monotonic() - t0)
                assert status_of(answer) == 200
                time.sleep(0.02)
        finally:
            for a in attackers:
                a.kill()
                a.wait()
            p.stop()
    # Probes follow one another, so the slow ones add up to the time the loop could not
    # answer. A parse on the loop stalls it 0.5-2 s per body, beside it (a thread holding the
    # GIL) 0.5 s or so, several bodies in the window: measured here, 3.5 s and 2.5 s of
    # probes over 0.1 s. With the workers: none over 0.05 s, with or without a CPU burner.
    # The budget lets a loaded CI host pause once; the median probe answers at once.
    took.sort()
    stalled = sum(t for t in took if t > 0.1)
    assert took[len(took) // 2] < 0.1 and stalled < 1.2, (stalled, took[-10:])

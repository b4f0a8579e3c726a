"""The transparent proxy and its exact-match cache, through the official SDK (issue 2)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.testing import FakeOpenAI
from tests.conftest import BackgroundLoop, ProxyServer, async_sdk, sdk
from tests.helpers import recheck_s_passes

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Name a persona"}],
}


def chat_raw(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(**{**CHAT, **extra})


def test_repeat_is_hit_with_same_body_and_no_upstream_call(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    """A repeated chat request is a HIT with the same body, and upstream is called once."""
    first = chat_raw(client)
    second = chat_raw(client)
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert second.http_response.content == first.http_response.content
    assert fake.count("/v1/chat/completions") == 1
    assert "age" in second.headers
    assert second.headers["cache-status"].startswith("openai-cache-proxy; hit")
    assert second.headers["x-request-id"] == first.headers["x-request-id"]
    assert "x-ratelimit-remaining-requests" in first.headers
    assert "x-ratelimit-remaining-requests" not in second.headers
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content


async def test_async_sdk_hit(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """The async SDK sees the same: MISS, then HIT with identical content."""
    async with async_sdk(proxy) as c:
        a = await c.chat.completions.with_raw_response.create(**CHAT)
        b = await c.chat.completions.with_raw_response.create(**CHAT)
    assert (a.headers["x-cache-status"], b.headers["x-cache-status"]) == ("MISS", "HIT")
    assert a.parse().model_dump() == b.parse().model_dump()
    assert fake.count() == 1


def test_embeddings_with_sdk_base64_default(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """Embeddings through the SDK (which asks for base64) are decoded and cached; a raw float
    request is a different key."""
    a = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=4)
    b = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=4)
    assert len(a.data) == 2 and len(a.data[0].embedding) == 4
    assert a.data[0].embedding == b.data[0].embedding
    assert fake.calls[0].json()["encoding_format"] == "base64"
    assert fake.count() == 1
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], dimensions=4, encoding_format="float"
    )
    assert fake.count() == 2
    assert len(floats.data[0].embedding) == 4


def test_responses_and_models(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """Responses are cached; GET /v1/models passes through every time."""
    r1 = client.responses.create(model="gpt-4.1", input="hello")
    r2 = client.responses.create(model="gpt-4.1", input="hello")
    assert r1.id == r2.id and r1.output_text == r2.output_text
    assert fake.count("/v1/responses") == 1
    m1 = client.models.list()
    m2 = client.models.with_raw_response.list()
    assert [m.id for m in m1.data] == [m.id for m in m2.parse().data]
    assert m2.headers["x-cache-status"] == "BYPASS"
    assert fake.count("/v1/models") == 2


@pytest.mark.parametrize(
    ("model", "status", "exc"),
    [
        ("fake-error-400", 400, openai.BadRequestError),
        ("fake-error-404", 404, openai.NotFoundError),
        ("fake-error-429", 429, openai.RateLimitError),
        ("fake-error-500", 500, openai.InternalServerError),
    ],
)
def test_errors_arrive_as_from_upstream_and_are_not_cached(
    client: openai.OpenAI,
    fake: FakeOpenAI,
    model: str,
    status: int,
    exc: type[openai.APIStatusError],
) -> None:
    """Upstream errors reach the SDK with their status and body, and are never cached."""
    for _ in range(2):
        with pytest.raises(exc) as info:
            client.chat.completions.create(**{**CHAT, "model": model})
        assert info.value.status_code == status
        assert info.value.body == {
            "message": f"Fake error {status}.",
            "type": "fake_error",
            "param": None,
            "code": f"fake_{status}",
        }
    assert fake.count() == 2


def test_401_from_upstream(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A wrong key gets upstream's own 401 (the recorded real body), twice, never cached."""
    with sdk(proxy, key="sk-bad") as c:
        for _ in range(2):
            with pytest.raises(openai.AuthenticationError) as info:
                c.chat.completions.create(**CHAT)
            assert info.value.code == "invalid_api_key"
    assert fake.count() == 2


def test_404_on_models_get(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """A 404 on a passed-through GET arrives as NotFoundError."""
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing-model")


async def _post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"Authorization": "Bearer sk-test-a", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    data = io.BytesIO(body) if len(body) > 1_000_000 else body
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=hdrs) as r:
        return r.status, dict(r.headers), await r.read()


async def test_key_ignores_order_whitespace_and_identity_headers(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """Reordered keys, other whitespace, 1.0 vs 1 and other SDK identity headers are one key."""
    url = proxy.url + "/v1/chat/completions"
    a = (
        b'{"model": "gpt-4o-mini", "temperature": 1, '
        b'"messages": [{"role": "user", "content": "x"}]}'
    )
    b = b'{"messages":[{"content":"x","role":"user"}],\n "temperature":1.0,"model":"gpt-4o-mini"}'
    ident = {"User-Agent": "OpenAI/Python 1.0", "X-Stainless-Os": "Linux"}
    s1, _h1, b1 = await _post(url, a, ident)
    s2, h2, b2 = await _post(
        url, b, {"User-Agent": "OpenAI/JS 4.0", "X-Stainless-Retry-Count": "2", "Accept": "*/*"}
    )
    assert (s1, s2) == (200, 200)
    assert h2["X-Cache-Status"] == "HIT" and b1 == b2
    assert fake.count() == 1


async def test_no_v1_prefix_still_works(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A base URL without /v1 reaches the same route and the same cache entry."""
    body = orjson.dumps(CHAT)
    _, _h1, b1 = await _post(proxy.url + "/v1/chat/completions", body)
    _, h2, b2 = await _post(proxy.url + "/chat/completions", body)
    assert h2["X-Cache-Status"] == "HIT" and b1 == b2
    assert fake.calls[0].path == "/v1/chat/completions"


def test_tenants_are_partitioned(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Another API key, organisation or project never gets this tenant's answer."""
    with (
        sdk(proxy, "sk-a") as a,
        sdk(proxy, "sk-b") as b,
        sdk(proxy, "sk-a", organization="org-2") as a_org,
        sdk(proxy, "sk-a", project="proj-2") as a_proj,
    ):
        answers = [c.chat.completions.create(**CHAT).id for c in (a, b, a_org, a_proj)]
        assert len(set(answers)) == 4
        assert fake.count() == 4
        assert a.chat.completions.create(**CHAT).id == answers[0]
    assert fake.count() == 4


def test_ignored_fields_share_a_key_other_fields_split_it(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    """user and metadata do not split the key; temperature (any other field) does."""
    first = client.chat.completions.create(**CHAT, user="alice")
    same = client.chat.completions.create(**CHAT, user="bob", metadata={"run": "2"}, store=False)
    assert fake.count() == 2  # store=False is a real field: it splits the key
    again = client.chat.completions.create(**CHAT, user="carol")
    assert again.id == first.id
    other = client.chat.completions.create(**CHAT, temperature=0.2)
    assert other.id not in (first.id, same.id)
    assert fake.count() == 3


def test_client_cache_controls(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """no-cache refreshes (and stores), no-store bypasses, namespaces partition."""
    first = chat_raw(client)
    refreshed = chat_raw(client, extra_headers={"Cache-Control": "no-cache"})
    assert refreshed.headers["x-cache-status"] == "REFRESH"
    assert refreshed.parse().id != first.parse().id
    hit = chat_raw(client)
    assert hit.headers["x-cache-status"] == "HIT" and hit.parse().id == refreshed.parse().id
    bypass = chat_raw(client, extra_headers={"Cache-Control": "no-store"})
    assert bypass.headers["x-cache-status"] == "BYPASS"
    assert chat_raw(client).parse().id == refreshed.parse().id  # no-store did not write
    ns = chat_raw(client, extra_headers={"X-Cache-Namespace": "tests"})
    assert ns.headers["x-cache-status"] == "MISS"
    assert (
        chat_raw(client, extra_headers={"X-Cache-Namespace": "tests"}).headers["x-cache-status"]
        == "HIT"
    )
    assert fake.count() == 4
    for call in fake.calls:
        assert "cache-control" not in {k.lower() for k in call.headers}
        assert "x-cache-namespace" not in {k.lower() for k in call.headers}


def test_max_age(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """max-age=N refuses stored answers older than N s, and stores the new one for N s."""

    def status(age: int) -> str:
        headers = {"Cache-Control": f"max-age={age}"}
        status: str = chat_raw(client, extra_headers=headers).headers["x-cache-status"]
        return status

    assert status(60) == "MISS"
    assert status(60) == "HIT"
    assert status(0) == "MISS"  # older than 0 s: fetched again, stored with a 0 s TTL
    assert chat_raw(client).headers["x-cache-status"] == "MISS"  # so it is already gone
    assert fake.count() == 3


async def test_body_limits_and_bad_json(start_proxy: Any, fake: FakeOpenAI) -> None:
    """An 8 MB body passes; above --max-body-mb is 413 with no upstream call; bad JSON is 400."""
    proxy = start_proxy(max_body_mb=10)
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 8_000_000}]})
    status, _, _ = await _post(proxy.url + "/v1/chat/completions", big)
    assert status == 200 and fake.count() == 1
    too_big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 11_000_000}]})
    status, _, body = await _post(proxy.url + "/v1/chat/completions", too_big)
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert fake.count() == 1
    status, _, body = await _post(proxy.url + "/v1/chat/completions", b'{"model": "x",')
    assert status == 400
    err = orjson.loads(body)["error"]
    assert (
        set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    )
    assert fake.count() == 1


def test_too_large_through_sdk(start_proxy: Any, fake: FakeOpenAI) -> None:
    """The SDK raises its own 413 error type for the proxy's 413."""
    proxy = start_proxy(max_body_mb=1)
    with sdk(proxy) as c, pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "y" * 2_000_000}]
        )
    assert info.value.status_code == 413
    assert fake.count() == 0


def test_embedded_store_survives_restart(
    start_proxy: Any, fake: FakeOpenAI, bg: BackgroundLoop
) -> None:
    """With no --cache, the SQLite store in the data dir keeps entries across a restart (the
    first process writes what it still has queued as it stops)."""
    first = start_proxy(cache="")
    with sdk(first) as c:
        answer = c.chat.completions.create(**CHAT).id
    bg.run(first.stop())
    second = start_proxy(cache="")
    with sdk(second) as c:
        again = c.chat.completions.with_raw_response.create(**CHAT)
    assert again.headers["x-cache-status"] == "HIT" and again.parse().id == answer
    assert fake.count("/v1/chat/completions") == 1
    assert fake.count("/v1/models") == 1  # the new process checked the credential once


async def test_unreachable_upstream_is_502(start_proxy: Any) -> None:
    """An upstream nobody listens on gives 502 in OpenAI's error shape."""
    from tests.conftest import free_port

    proxy = start_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    status, _, body = await _post(proxy.url + "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"


async def test_upstream_timeout_is_504(start_proxy: Any, fake: FakeOpenAI) -> None:
    """An upstream slower than the read timeout gives 504 in OpenAI's error shape."""
    fake.latency = 2.0
    proxy = start_proxy(upstream_read_timeout_s=0.3)
    status, _, body = await _post(proxy.url + "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 504
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    status, _, _ = await _post(proxy.url + "/v1/files", b"{}")
    assert status == 504


async def test_revoked_key_stops_getting_cached_answers(
    start_proxy: Any, fake: FakeOpenAI, bg: BackgroundLoop
) -> None:
    """Past --auth-recheck-s, a HIT re-checks the credential upstream: a revoked key gets
    upstream's 401 instead of the cached answer; a valid key still gets its HITs."""
    proxy = start_proxy(auth_recheck_s=3600)
    async with async_sdk(proxy, "sk-soon-revoked") as a, async_sdk(proxy, "sk-fine") as b:
        await a.chat.completions.create(**CHAT)
        await b.chat.completions.create(**CHAT)
        hit = await a.chat.completions.with_raw_response.create(**CHAT)
        assert hit.headers["x-cache-status"] == "HIT"
        assert fake.count("/v1/models") == 0  # seen accepted within the hour: no check
        fake.revoked_keys.add("sk-soon-revoked")
        recheck_s_passes(bg, proxy)
        with pytest.raises(openai.AuthenticationError):
            await a.chat.completions.create(**CHAT)
        ok = await b.chat.completions.with_raw_response.create(**CHAT)
        assert ok.headers["x-cache-status"] == "HIT"
    assert fake.count("/v1/chat/completions") == 2 and fake.count("/v1/models") == 2


async def test_gzipped_upstream_answers_are_decoded_once(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A gzip-encoded upstream answer reaches the client decoded (no stale Content-Encoding or
    Content-Length), and its HIT carries the same bytes."""
    fake.gzip = True
    body = orjson.dumps(CHAT)
    raw_headers = {"Accept-Encoding": "identity"}
    s1, h1, b1 = await _post(proxy.url + "/v1/chat/completions", body, raw_headers)
    s2, h2, b2 = await _post(proxy.url + "/v1/chat/completions", body, raw_headers)
    assert (s1, s2) == (200, 200) and b1 == b2
    assert orjson.loads(b1)["object"] == "chat.completion"
    assert "Content-Encoding" not in h1 and "Content-Encoding" not in h2
    assert h2["X-Cache-Status"] == "HIT" and int(h2["Content-Length"]) == len(b2)
    assert "gzip" in fake.calls[0].headers.get("Accept-Encoding", "")


async def test_sqlite_on_the_event_loop_would_fail_the_suite(tmp_path: Path) -> None:
    """The guard that proves the SQLite store stays off the loop can fail: a direct sqlite
    call on the loop raises."""
    from blockbuster import BlockingError

    from proxy.stores import SQLiteStore

    store = SQLiteStore(tmp_path / "c.db")
    with pytest.raises(BlockingError):
        store._get("k")  # what get() runs on its worker thread
    assert await store.get("k") is None  # through the thread: fine
    await store.aclose()


async def test_async_sdk_sees_what_upstream_says(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Through the async SDK, embeddings, responses and models work, and each error arrives
    exactly as the same SDK gets it from the upstream directly (type, status, body)."""
    direct = openai.AsyncOpenAI(base_url=fake.base_url + "/v1", api_key="sk-test-a", max_retries=0)
    async with async_sdk(proxy) as c, direct:
        emb = await c.embeddings.create(model="text-embedding-3-small", input="hi", dimensions=8)
        assert len(emb.data[0].embedding) == 8
        r1 = await c.responses.create(model="gpt-4.1", input="async hello")
        r2 = await c.responses.create(model="gpt-4.1", input="async hello")
        assert r1.id == r2.id and r1.output_text
        assert "gpt-4o-mini" in [m.id async for m in c.models.list()]
        for status in (400, 404, 429, 500):
            body = {**CHAT, "model": f"fake-error-{status}"}
            errors = []
            for client in (c, direct):
                with pytest.raises(openai.APIStatusError) as info:
                    await client.chat.completions.create(**body)
                errors.append(info.value)
            via, upstream = errors
            assert type(via) is type(upstream) and via.status_code == upstream.status_code
            assert via.body == upstream.body and via.message == upstream.message
        for client in (c, direct):  # a wrong key: the recorded real 401
            client.api_key = "sk-bad"
        errs = []
        for client in (c, direct):
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(**CHAT)
            errs.append(info.value)
        assert errs[0].body == errs[1].body and errs[0].status_code == 401


async def test_background_requests_are_never_cached(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A request with side effects (background: true) passes through every time."""
    body = orjson.dumps({"model": "gpt-4.1", "input": "long job", "background": True})
    for _ in range(2):
        status, headers, _ = await _post(proxy.url + "/v1/responses", body)
        assert status == 200 and headers["X-Cache-Status"] == "BYPASS"
    assert fake.count("/v1/responses") == 2


async def test_azure_deployment_paths_are_cached_per_api_version(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """Azure classic paths with an api-key header are cached; api-version splits the key."""
    path = "/openai/deployments/my-gpt/chat/completions"
    body = orjson.dumps({"messages": [{"role": "user", "content": "azure"}]})
    azure = {"api-key": "azure-key-1", "Authorization": ""}
    results = []
    for version in ("2024-06-01", "2024-06-01", "2025-01-01"):
        url = f"{proxy.url}{path}?api-version={version}"
        results.append(await _post(url, body, azure))
    assert [h["X-Cache-Status"] for _, h, _ in results] == ["MISS", "HIT", "MISS"]
    assert fake.calls[0].path == path and fake.calls[0].query == "api-version=2024-06-01"
    assert fake.calls[0].headers.get("api-key") == "azure-key-1"
    other_key = await _post(
        f"{proxy.url}{path}?api-version=2024-06-01",
        body,
        {"api-key": "azure-key-2", "Authorization": ""},
    )
    assert other_key[1]["X-Cache-Status"] == "MISS"

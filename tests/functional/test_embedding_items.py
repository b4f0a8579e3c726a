"""Embeddings cached per input item, through the official SDK (float and base64): only the
missing items go upstream, in one call, the answer keeps the original order, items in flight
are joined, and HIT / MISS / PARTIAL say where the items came from."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from proxy.report import Report
from proxy.testing import FakeOpenAI
from proxy.testing.fake_openai import bag_of_words
from tests.conftest import BackgroundLoop, ProxyServer, RedisServer, async_sdk, sdk
from tests.helpers import eventually, recheck_s_passes, wait_until

EMB = "/v1/embeddings"
MODEL = "text-embedding-3-small"


def texts(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} number {i} about topic{i % 97} and subject{i}" for i in range(n)]


def embed(client: openai.OpenAI, inputs: list[str] | list[list[int]], **kw: Any) -> Any:
    return client.embeddings.with_raw_response.create(model=MODEL, input=inputs, **kw)


def sent_items(fake: FakeOpenAI) -> list[list[Any]]:
    return [c.json()["input"] for c in fake.calls if c.path == EMB]


def assert_matches(answer: Any, inputs: list[str] | list[list[int]], dims: int) -> None:
    """Each returned embedding is the fake's embedding of the input at that position."""
    data = answer.parse().data
    assert [d.index for d in data] == list(range(len(inputs)))
    for d, text in zip(data, inputs, strict=True):
        assert d.embedding == pytest.approx(bag_of_words(text, dims), abs=1e-6)


def done_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "request.done"]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_only_missing_items_go_upstream(
    proxy: ProxyServer, fake: FakeOpenAI, encoding: str
) -> None:
    """A re-sent list with two changed items sends only those two, in one call; the answer
    has every item in order, usage counts the two, the status is PARTIAL; the same list again
    is a HIT with no call at all."""
    client = sdk(proxy)
    kw = {"encoding_format": encoding} if encoding == "float" else {}  # the SDK asks base64
    first_in = texts(6)
    first = embed(client, first_in, dimensions=32, **kw)
    assert first.headers["x-cache-status"] == "MISS"
    assert first.parse().usage.prompt_tokens == 4 * 6
    second_in = [*first_in[:2], "a changed text", *first_in[3:5], "another new one"]
    with capture_logs() as logs:
        second = embed(client, second_in, dimensions=32, **kw)
    assert second.headers["x-cache-status"] == "PARTIAL"
    assert second.headers["cache-status"] == "openai-cache-proxy; fwd=partial"
    assert second.headers["x-request-id"] == "req_fake_2"  # the call's own, as on a MISS
    assert sent_items(fake) == [first_in, ["a changed text", "another new one"]]
    assert second.parse().usage.prompt_tokens == 4 * 2
    assert_matches(second, second_in, 32)
    line = done_lines(logs)[-1]
    assert (line["cache"], line["items"], line["items_cached"], line["items_sent"]) == (
        "partial",
        6,
        4,
        2,
    )
    assert line["items_saved_tokens"] > 0 and line["tokens_in"] == 8
    third = embed(client, second_in, dimensions=32, **kw)
    assert third.headers["x-cache-status"] == "HIT" and fake.count(EMB) == 2
    assert "x-request-id" not in third.headers and "x-ratelimit-limit-requests" not in third.headers
    assert third.parse().usage.prompt_tokens == 0
    assert_matches(third, second_in, 32)


def test_encoding_and_dimensions_are_in_the_item_key(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Items embedded as base64 or at another size are other entries: a float request for
    the same texts is a MISS, and so is another `dimensions`."""
    client = sdk(proxy)
    inputs = texts(3)
    embed(client, inputs, dimensions=16)  # base64 (the SDK's default)
    floats = embed(client, inputs, dimensions=16, encoding_format="float")
    bigger = embed(client, inputs, dimensions=24, encoding_format="float")
    assert floats.headers["x-cache-status"] == "MISS" and bigger.headers["x-cache-status"] == "MISS"
    assert fake.count(EMB) == 3
    assert_matches(floats, inputs, 16)


def test_items_stay_in_their_tenant(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Another API key sending the same list gets none of the first tenant's items."""
    embed(sdk(proxy), texts(3), dimensions=8)
    other = embed(sdk(proxy, key="sk-test-b"), texts(3), dimensions=8)
    assert other.headers["x-cache-status"] == "MISS"
    assert sent_items(fake) == [texts(3), texts(3)]


def test_a_2048_item_rerun_with_ten_changed_sends_ten(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """2048 items, then the same list with 10 changed: the second call upstream carries
    exactly the 10, and all 2048 come back in order."""
    client = sdk(proxy, timeout=120)
    first_in = texts(2048)
    first = embed(client, first_in, dimensions=16)
    assert first.headers["x-cache-status"] == "MISS"
    changed = {5, 100, 333, 512, 1000, 1024, 1500, 1999, 2046, 2047}
    second_in = [f"changed {i}" if i in changed else t for i, t in enumerate(first_in)]
    second = embed(client, second_in, dimensions=16)
    assert second.headers["x-cache-status"] == "PARTIAL"
    assert sent_items(fake)[1] == [second_in[i] for i in sorted(changed)]
    assert_matches(second, second_in, 16)


async def test_items_in_flight_are_joined(start_proxy: Any, fake: FakeOpenAI) -> None:
    """Two lists that overlap, sent while the first is still upstream: the overlapping items
    go upstream once, the second request waits for them and sends only its own."""
    proxy = start_proxy()
    fake.latencies = [0.8, 0.0]
    a, b = texts(3, "a"), [*texts(3, "a")[1:], "only in b"]
    async with async_sdk(proxy) as client:

        async def later() -> Any:
            await asyncio.sleep(0.3)
            return await client.embeddings.with_raw_response.create(
                model=MODEL, input=b, dimensions=8
            )

        first, second = await asyncio.gather(
            client.embeddings.with_raw_response.create(model=MODEL, input=a, dimensions=8),
            later(),
        )
    assert sent_items(fake) == [a, ["only in b"]]
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "PARTIAL"
    assert_matches(second, b, 8)


def test_an_upstream_error_is_relayed_and_nothing_stored(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """The upstream's 429 reaches the client as it came; the items are not stored."""
    client = sdk(proxy)
    fake.errors = [(429, b'{"error":{"message":"slow down","type":"rate_limit","code":null}}')]
    with pytest.raises(Exception, match="slow down"):
        embed(client, texts(3), dimensions=8)
    again = embed(client, texts(3), dimensions=8)
    assert again.headers["x-cache-status"] == "MISS" and fake.count(EMB) == 2


def test_partial_is_counted_in_stats_metrics_and_report(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """PARTIAL answers and the items behind them show in /_proxy/stats, the metrics and the
    report, with the saved estimate apart from what was spent."""
    client = sdk(proxy)
    with capture_logs() as logs:
        embed(client, texts(4), dimensions=8)
        embed(client, [*texts(4)[:3], "new"], dimensions=8)
        embed(client, texts(4), dimensions=8)
    with urllib.request.urlopen(proxy.url + "/_proxy/stats") as r:
        stats = orjson.loads(r.read())
    assert (stats["misses"], stats["partials"], stats["hits"]) == (1, 1, 1)
    assert stats["embedding_items"] == {"cached": 7, "joined": 0, "sent": 5}
    assert stats["per_route"]["/v1/embeddings"]["partial"] == 1
    assert stats["tokens"]["in_spent"] == 4 * 5  # the fake counts 4 tokens an item
    assert stats["tokens"]["in_saved"] == 4 * 3 + 4 * 4  # the shares the entries kept
    with urllib.request.urlopen(proxy.url + "/_proxy/metrics") as r:
        metrics = r.read().decode()
    assert 'cache="partial"' in metrics and "ocp_embedding_items_total{" in metrics
    report = Report("route")
    for line in done_lines(logs):
        report.feed(orjson.dumps(line), None, None)
    row = report.rows()[-1]
    assert (row["partial"], row["items_cached"], row["items_sent"]) == (1, 7, 5)
    assert row["saved_usd"] > 0


def test_items_across_two_proxies_on_one_redis(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer
) -> None:
    """With Redis, the items one instance stored are found by another: a list re-sent to the
    second instance with one new item sends only that item."""
    one = start_proxy(cache=redis_server.url)
    two = start_proxy(cache=redis_server.url)
    embed(sdk(one), texts(40), dimensions=8)
    r = redis.Redis.from_url(redis_server.url)
    eventually(lambda: len(r.keys("*")) >= 40)  # the writes go in batches, after the answer
    r.close()
    again = embed(sdk(two), [*texts(40), "new"], dimensions=8)
    assert again.headers["x-cache-status"] == "PARTIAL"
    assert sent_items(fake) == [texts(40), ["new"]]
    assert_matches(again, [*texts(40), "new"], 8)


def test_an_answer_that_does_not_match_the_items_is_a_502(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A 200 whose data does not hold one embedding per item sent is never stored nor
    relayed as the whole list's answer: 502, OpenAI-shaped."""
    client = sdk(proxy)
    wrong = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[1.0]}],'
    fake.errors = [(200, wrong + b'"model":"m","usage":{"prompt_tokens":1,"total_tokens":1}}')]
    with pytest.raises(Exception, match="does not match the items"):
        embed(client, texts(3), dimensions=8)
    again = embed(client, texts(3), dimensions=8)
    assert again.headers["x-cache-status"] == "MISS" and fake.count(EMB) == 2


def test_a_revoked_key_gets_no_cached_items(
    start_proxy: Any, fake: FakeOpenAI, bg: BackgroundLoop
) -> None:
    """Past --auth-recheck-s, cached items are served only after the credential is checked
    again: a revoked key gets the upstream's 401, not the items it stored."""
    proxy = start_proxy(auth_recheck_s=3600)
    client = sdk(proxy, key="sk-soon-revoked")
    embed(client, texts(3), dimensions=8)
    assert embed(client, texts(3), dimensions=8).headers["x-cache-status"] == "HIT"
    assert fake.count("/v1/models") == 0  # seen accepted within the hour: no check
    fake.revoked_keys.add("sk-soon-revoked")
    recheck_s_passes(bg, proxy)
    with pytest.raises(openai.AuthenticationError):
        embed(client, texts(3), dimensions=8)
    assert fake.count(EMB) == 1 and fake.count("/v1/models") == 1


WORDS = [f"w{i} apple" for i in range(12)]


@settings(
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(lists=st.lists(st.lists(st.sampled_from(WORDS), min_size=2, max_size=9), max_size=4))
def test_any_sequence_of_lists_gets_every_item_in_place(
    start_proxy: Any, fake: FakeOpenAI, lists: list[list[str]]
) -> None:
    """Whatever lists come in, with repeats inside a list and across lists, each answer has
    the right embedding at every position and no item goes upstream twice (print_blob: a
    failure prints how to reproduce it)."""
    proxy = start_proxy()
    calls = len(fake.calls)
    client = sdk(proxy)
    for inputs in lists:
        answer = embed(client, inputs, dimensions=8, encoding_format="float")
        assert_matches(answer, inputs, 8)
    sent = [i for c in fake.calls[calls:] if c.path == EMB for i in c.json()["input"]]
    assert sorted(sent) == sorted({i for inputs in lists for i in inputs})


def test_token_arrays_are_items_too(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A list of token arrays is cached per array: a new array alone goes upstream."""
    client = sdk(proxy)
    first = [[1, 2, 3], [40, 50], [600]]
    embed(client, first, dimensions=8, encoding_format="float")
    second = [[40, 50], [7, 8, 9], [1, 2, 3]]
    answer = embed(client, second, dimensions=8, encoding_format="float")
    assert answer.headers["x-cache-status"] == "PARTIAL"
    assert sent_items(fake) == [first, [[7, 8, 9]]]
    assert_matches(answer, second, 8)


def test_a_dead_store_passes_items_through(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer
) -> None:
    """With Redis gone, a list is answered whole from upstream (BYPASS), never an error."""
    proxy = start_proxy(cache=redis_server.url)
    client = sdk(proxy)
    embed(client, texts(5), dimensions=8)
    redis_server.stop()
    answer = embed(client, [*texts(5), "new"], dimensions=8)
    assert answer.headers["x-cache-status"] == "BYPASS"
    assert_matches(answer, [*texts(5), "new"], 8)
    assert sent_items(fake)[-1] == [*texts(5), "new"]


async def test_a_rule_without_coalescing_joins_no_items(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """With coalesce = false, an item in flight for another request is sent again."""
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/embeddings"\ncoalesce = false\n')
    proxy = start_proxy(rules=rules)
    a, b = texts(3, "c"), [*texts(3, "c")[1:], "only in b"]
    async with async_sdk(proxy) as client:
        fake.hold()
        try:
            first = asyncio.ensure_future(
                client.embeddings.create(model=MODEL, input=a, dimensions=8)
            )
            await wait_until(lambda: fake.count(EMB) == 1, within_s=30.0)  # a's items in flight
            second = asyncio.ensure_future(
                client.embeddings.create(model=MODEL, input=b, dimensions=8)
            )
            await wait_until(lambda: fake.count(EMB) == 2, within_s=30.0)
        finally:
            fake.release()
        await asyncio.gather(first, second)
    assert sent_items(fake) == [a, b]


def test_stale_items_cover_an_upstream_failure(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Past ttl_s, within stale_if_error_s: an upstream 503 is covered by the stale items
    (STALE, fwd-status=503) when every missing item has one; a list with an item never
    stored gets the 503 as it came."""
    import time

    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/embeddings"\nttl_s = 0.3\nstale_if_error_s = 60\n')
    proxy = start_proxy(rules=rules)
    client = sdk(proxy)
    embed(client, texts(4), dimensions=8, encoding_format="float")
    time.sleep(0.5)
    err = b'{"error":{"message":"overloaded","type":"server_error","code":null}}'
    fake.errors = [(503, err), (503, err)]
    covered = embed(client, texts(4), dimensions=8, encoding_format="float")
    assert covered.headers["x-cache-status"] == "STALE"
    assert covered.headers["cache-status"] == "openai-cache-proxy; fwd=stale; fwd-status=503"
    assert_matches(covered, texts(4), 8)
    with pytest.raises(Exception, match="overloaded"):
        embed(client, [*texts(4), "never stored"], dimensions=8, encoding_format="float")


def _post(
    proxy: ProxyServer, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(proxy.base_url.removesuffix("/v1") + path, data=body)
    for name, value in headers.items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


async def test_a_purge_during_the_call_keeps_its_items_out(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """A purge by model made while a list's items are upstream: the items that come back
    after it are not stored, so the same list again goes upstream (as a whole answer does)."""
    proxy = start_proxy()
    items = texts(3, "purged")
    async with async_sdk(proxy) as client:
        fake.hold()
        try:
            call = asyncio.ensure_future(
                client.embeddings.with_raw_response.create(model=MODEL, input=items, dimensions=8)
            )
            await wait_until(lambda: fake.count(EMB) == 1, within_s=30.0)  # the items are upstream
            status, _, _ = await asyncio.to_thread(
                _post,
                proxy,
                "/_proxy/purge",
                orjson.dumps({"model": MODEL}),
                {"Content-Type": "application/json"},
            )
        finally:
            fake.release()
        first = await call
        assert status == 200 and first.headers["x-cache-status"] == "MISS"
        again = await client.embeddings.with_raw_response.create(
            model=MODEL, input=items, dimensions=8
        )
    assert again.headers["x-cache-status"] == "MISS" and fake.count(EMB) == 2


@pytest.mark.parametrize("extra", [b'"x":1e300', b'"y":9007199254740993.0'])
def test_a_float_no_double_holds_keys_the_list_whole(
    proxy: ProxyServer, fake: FakeOpenAI, extra: bytes
) -> None:
    """A list whose other fields hold a number no double keeps exactly is not cached item
    by item (its items could not be keyed exactly): it is answered, never a 500."""
    body = b'{"model":"' + MODEL.encode() + b'","input":["a","b"],' + extra + b"}"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-a"}
    status, answer, got = _post(proxy, EMB, body, headers)
    assert status == 200, answer[:300]
    assert got["X-Cache-Status"] == "MISS" and len(orjson.loads(answer)["data"]) == 2


def test_a_long_model_name_is_purged_by_its_full_name(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Items of a model whose name is longer than any label are tagged with the whole name:
    a purge by that name takes them, and the list goes upstream again."""
    model = "ft:text-embedding-3-small:acme-corp:" + "x" * 120
    client = sdk(proxy)
    client.embeddings.create(model=model, input=texts(2, "long"), dimensions=8)
    status, body, _ = _post(
        proxy,
        "/_proxy/purge",
        orjson.dumps({"model": model}),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and orjson.loads(body)["purged"] == 2
    again = client.embeddings.with_raw_response.create(
        model=model, input=texts(2, "long"), dimensions=8
    )
    assert again.headers["x-cache-status"] == "MISS"

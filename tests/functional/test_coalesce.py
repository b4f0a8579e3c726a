"""Identical requests in flight share one upstream call, streams included (issue 4)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.testing import FakeOpenAI
from tests.conftest import BackgroundLoop, ProxyServer
from tests.helpers import HEADERS, flight_readers, joined, post_json, post_stream, wait_until

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Persona for Ann"}],
}
STREAM = {**CHAT, "stream": True}


async def test_fifty_identical_requests_one_upstream_call(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """50 identical requests held at the upstream together (then 600 ms more): 1 call, 50
    identical answers, 49 COALESCED, in about one upstream latency, not fifty."""
    fake.latency = 0.6  # after the release
    url = proxy.url + "/v1/chat/completions"
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(post_json(url, CHAT)) for _ in range(50)]
        # the leader reads its JSON answer itself: the 49 others read the flight
        await wait_until(lambda: fake.count() == 1 and flight_readers(proxy) == 49, 30.0)
    finally:
        fake.release()
    t0 = time.monotonic()
    results = await asyncio.gather(*jobs)
    took = time.monotonic() - t0
    assert fake.count() == 1
    assert {body for _, _, body in results} == {results[0][2]}
    assert all(status == 200 for status, _, _ in results)
    labels = [h["X-Cache-Status"] for _, h, _ in results]
    assert labels.count("COALESCED") == 49 and labels.count("MISS") == 1
    coalesced = next(h for _, h, _ in results if h["X-Cache-Status"] == "COALESCED")
    assert coalesced["Cache-Status"].endswith("fwd=miss; collapsed")
    # one after another they would take 50 x 0.6 s = 30 s: this only rules that out
    assert took < 10 * fake.latency, f"took {took:.2f}s after one 0.6s upstream call"


async def test_twenty_identical_streams_one_upstream_call(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """20 concurrent identical streamed requests: 1 call, 20 complete identical streams."""
    fake.chunk_delay = 0.02
    url = proxy.url + "/v1/chat/completions"
    results = await asyncio.gather(*(post_stream(url, STREAM) for _ in range(20)))
    assert fake.count() == 1
    bodies = {joined(chunks) for _, _, chunks in results}
    assert len(bodies) == 1 and next(iter(bodies)).endswith(b"data: [DONE]\n\n")


async def test_late_joiner_gets_whole_stream_and_ends_with_leader(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A duplicate starting three chunks into a stream gets it all from byte 0 at once, then
    follows live and ends with the leader, not a whole stream later."""
    fake.chunk_delay = 0.25  # 8 chunks, then the end: about 2 s
    url = proxy.url + "/v1/chat/completions"
    leader = asyncio.ensure_future(post_stream(url, STREAM))
    await wait_until(lambda: len(fake.sent) >= 3)  # the stream is 0.5 s under way
    _, jh, joiner_chunks = await post_stream(url, STREAM)
    _, lh, leader_chunks = await leader
    assert jh["X-Cache-Status"] == "COALESCED" and lh["X-Cache-Status"] == "MISS"
    assert joined(joiner_chunks) == joined(leader_chunks)
    assert fake.count() == 1 and len(fake.sent) == 8
    # its first bytes came before the upstream sent its last chunk (a joiner kept until the
    # answer is whole would start one chunk_delay after it, with the end) ...
    assert joiner_chunks[0][0] < fake.sent[-1]
    # ... and its end with the leader's (a joiner paced like the upstream from where it joined
    # would end 2 chunk_delays or more later)
    assert abs(joiner_chunks[-1][0] - leader_chunks[-1][0]) < fake.chunk_delay


async def test_upstream_error_reaches_every_waiter_then_retries(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """10 concurrent requests whose upstream answers 500: all get the 500 from one call, and
    the next identical request goes upstream again."""
    body = {**CHAT, "model": "fake-error-500"}
    url = proxy.url + "/v1/chat/completions"
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(post_json(url, body)) for _ in range(10)]
        await wait_until(lambda: fake.count() == 1 and flight_readers(proxy) == 9, 30.0)
    finally:
        fake.release()
    results = await asyncio.gather(*jobs)
    assert [s for s, _, _ in results] == [500] * 10
    assert {b for _, _, b in results} == {results[0][2]}
    assert orjson.loads(results[0][2])["error"]["code"] == "fake_500"
    assert fake.count() == 1
    status, _, _ = await post_json(url, body)
    assert status == 500 and fake.count() == 2


async def test_different_prompts_and_tenants_never_merge(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """Concurrent requests that differ in prompt or tenant each get their own upstream call."""
    fake.latency = 0.2
    url = proxy.url + "/v1/chat/completions"
    jobs = [
        post_json(url, {**CHAT, "messages": [{"role": "user", "content": f"p{i}"}]})
        for i in range(5)
    ]
    jobs += [post_json(url, CHAT, {"Authorization": f"Bearer sk-tenant-{i}"}) for i in range(3)]
    jobs += [post_json(url, CHAT, {"OpenAI-Organization": "org-other"})]
    results = await asyncio.gather(*jobs)
    assert fake.count() == 9
    assert len({b for _, _, b in results}) == 9


async def test_a_slow_upstream_is_not_a_silent_leader(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A leader whose request is out and whose answer's head takes longer than lock_timeout_s
    is working, not hanging: its duplicates keep waiting and share its one upstream call."""
    rules = tmp_path / "r.toml"
    lock_timeout_s = 0.3
    rules.write_text(
        f'[[rule]]\nroute = "/v1/chat/completions"\nlock_timeout_s = {lock_timeout_s}\n'
    )
    proxy = start_proxy(rules=rules)
    url = proxy.url + "/v1/chat/completions"
    fake.hold()  # the leader's request is out; the head of its answer waits for release()
    try:
        leader = asyncio.ensure_future(post_json(url, CHAT))
        await wait_until(lambda: fake.count() == 1)
        dups = [asyncio.ensure_future(post_json(url, CHAT)) for _ in range(4)]
        await wait_until(lambda: flight_readers(proxy) == 4)
        await asyncio.sleep(3 * lock_timeout_s)  # past their lock timeout (slow machine: further)
        assert fake.count() == 1  # none of them gave up on the leader and went upstream
    finally:
        fake.release()
    results = await asyncio.gather(*dups)
    status, headers, _ = await leader
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert [(s, h["X-Cache-Status"]) for s, h, _ in results] == [(200, "COALESCED")] * 4
    assert fake.count() == 1


async def test_followers_of_a_slow_leader_wait_only_up_to_the_read_timeout(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An upstream silent past --upstream-read-timeout-s (here: held for ever): the leader and
    its followers all get the proxy's 504 then, after one upstream call, not a wait as long
    as the upstream's."""
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\nlock_timeout_s = 0.2\n')
    read_timeout = 3.0
    proxy = start_proxy(rules=rules, upstream_read_timeout_s=read_timeout)
    url = proxy.url + "/v1/chat/completions"
    fake.hold()  # the upstream stays silent until the test ends
    try:
        t0 = time.monotonic()
        leader = asyncio.ensure_future(post_json(url, CHAT))
        await wait_until(lambda: fake.count() == 1)
        followers = [asyncio.ensure_future(post_json(url, CHAT)) for _ in range(3)]
        await wait_until(lambda: flight_readers(proxy) == 3)  # long before the read timeout
        async with asyncio.timeout(10 * read_timeout):  # (held: the upstream never answers)
            results = await asyncio.gather(leader, *followers)
        took = time.monotonic() - t0
    finally:
        fake.release()
    assert [s for s, _, _ in results] == [504] * 4
    assert fake.count() == 1
    assert 0.9 * read_timeout < took < 3 * read_timeout


@pytest.mark.parametrize("body", [STREAM, CHAT], ids=["stream-task", "inline-handler"])
async def test_cancelled_leader_task_fails_waiters_fast(
    proxy: ProxyServer, fake: FakeOpenAI, bg: BackgroundLoop, body: dict[str, Any]
) -> None:
    """A cancelled upstream read leaves no stuck flight: every waiter gets an error at once.
    A stream is read by its own task; a whole answer by the leading client's handler (whose
    own client then loses its connection)."""
    url = proxy.url + "/v1/chat/completions"

    async def ask() -> int:
        try:
            status, _, _ = await post_json(url, body)
        except aiohttp.ClientError:
            return -1  # the cancelled handler's own client
        return status

    st = proxy.state
    readers = 3 if body is STREAM else 2  # (a leader reading a whole answer has no reader)
    fake.hold()  # the upstream never answers: only the cancellation ends the flight
    try:
        jobs = [asyncio.ensure_future(ask()) for _ in range(3)]
        await wait_until(
            lambda: len(st.flights) == 1 and fake.count() == 1 and flight_readers(proxy) == readers
        )
        flight = st.flights.get(next(iter(st.flights._flights)))
        assert flight is not None and flight.task is not None
        bg.call(flight.task.cancel)
        t0 = time.monotonic()
        async with asyncio.timeout(60):  # a stuck waiter would wait for ever
            results = await asyncio.gather(*jobs)
        took = time.monotonic() - t0
    finally:
        fake.release()
    # "at once": well before the 30 s lock timeout after which a waiter gives up on a leader
    assert took < 5.0
    assert sorted(results) == ([502] * 3 if body is STREAM else [-1, 502, 502])
    assert fake.count() == 1
    await wait_until(lambda: len(st.flights) == 0)


async def test_leader_client_hangs_up_waiters_still_served(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """The leader's client leaving does not stop the fetch: waiters get the whole stream, and
    a waiter leaving affects nobody else."""
    fake.chunk_delay = 0.05
    url = proxy.url + "/v1/chat/completions"

    async def leave_after_first_chunk() -> bytes:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, data=orjson.dumps(STREAM), headers=HEADERS) as r,
        ):
            return await r.content.readany()

    first = await leave_after_first_chunk()  # the leader leaves
    quitter = asyncio.ensure_future(leave_after_first_chunk())  # a waiter leaves too
    _, headers, chunks = await post_stream(url, STREAM)
    await quitter
    assert headers["X-Cache-Status"] in ("COALESCED", "HIT")
    assert joined(chunks).startswith(first) and joined(chunks).endswith(b"data: [DONE]\n\n")
    assert fake.count() == 1


async def test_slow_waiter_does_not_slow_the_others(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """One reader that reads slowly lags alone; the others finish with the upstream."""
    fake.chunk_delay = 0.02
    url = proxy.url + "/v1/chat/completions"

    async def slow() -> tuple[float, bytes]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, data=orjson.dumps(STREAM), headers=HEADERS) as r,
        ):
            data = b""
            while chunk := await r.content.read(64):
                data += chunk
                await asyncio.sleep(0.05)
            return time.monotonic(), data

    slow_job = asyncio.ensure_future(slow())
    await asyncio.sleep(0.05)
    fast = await asyncio.gather(*(post_stream(url, STREAM) for _ in range(5)))
    fast_end = max(chunks[-1][0] for _, _, chunks in fast)
    slow_end, slow_body = await slow_job
    assert slow_end > fast_end
    assert {joined(c) for _, _, c in fast} == {slow_body}
    assert fake.count() == 1


async def test_coalesce_without_store_and_debounce(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """store = false keeps coalescing; debounce_s reuses a just-finished answer for a while;
    Cache-Control: no-store opts out of both."""
    rules = tmp_path / "r.toml"
    debounce_s = 2.0
    rules.write_text(
        f'[[rule]]\nroute = "/v1/chat/completions"\nstore = false\ndebounce_s = {debounce_s}\n'
    )
    proxy = start_proxy(rules=rules)
    url = proxy.url + "/v1/chat/completions"
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(post_json(url, CHAT)) for _ in range(5)]
        await wait_until(lambda: fake.count() == 1 and flight_readers(proxy) == 4, 30.0)
    finally:
        fake.release()
    burst = await asyncio.gather(*jobs)
    assert fake.count() == 1 and len({b for _, _, b in burst}) == 1
    _, headers, body = await post_json(url, CHAT)  # within the debounce window
    assert headers["X-Cache-Status"] == "COALESCED" and body == burst[0][2]
    _, headers, _ = await post_json(url, CHAT, {"Cache-Control": "no-store"})
    assert headers["X-Cache-Status"] == "BYPASS" and fake.count() == 2
    # the window ends: the finished flight is let go (by its timer, debounce_s after the end)
    await wait_until(lambda: len(proxy.state.flights) == 0, debounce_s + 30.0)
    _status, headers, body = await post_json(url, CHAT)  # after it: not stored, so upstream again
    assert headers["X-Cache-Status"] == "MISS" and body != burst[0][2]
    assert fake.count() == 3


async def test_idempotency_key(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """Idempotency-Key: same key and tenant -> the same answer, even on an uncached route;
    the same key with another body -> 422; the header never goes upstream."""
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\nenabled = false\n')
    proxy = start_proxy(rules=rules)
    url = proxy.url + "/v1/chat/completions"
    key = {"Idempotency-Key": "order-42"}
    s1, _h1, b1 = await post_json(url, CHAT, key)
    s2, h2, b2 = await post_json(url, CHAT, key)
    assert (s1, s2) == (200, 200) and b1 == b2 and h2["X-Cache-Status"] == "HIT"
    assert fake.count() == 1
    other = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
    s3, _, b3 = await post_json(url, other, key)
    assert s3 == 422
    err = orjson.loads(b3)["error"]
    assert err["code"] == "idempotency_key_reused" and err["type"] == "invalid_request_error"
    s4, _, b4 = await post_json(url, CHAT, {**key, "Authorization": "Bearer sk-someone-else"})
    assert s4 == 200 and b4 != b1  # keys are per tenant
    without = await post_json(url, CHAT)
    assert without[2] != b1  # the route itself is not cached
    assert fake.count() == 3
    assert all("idempotency-key" not in {k.lower() for k in c.headers} for c in fake.calls)


async def test_idempotency_key_concurrent_duplicates_coalesce(
    start_proxy: Any, fake: FakeOpenAI
) -> None:
    """Concurrent retries with one Idempotency-Key make one upstream call."""
    proxy = start_proxy()
    url = proxy.url + "/v1/embeddings"
    body = {"model": "text-embedding-3-small", "input": "x"}
    headers = {"Idempotency-Key": "k1", "Cache-Control": "no-store"}
    fake.hold()
    try:
        jobs = [asyncio.ensure_future(post_json(url, body, headers)) for _ in range(5)]
        await wait_until(lambda: fake.count() == 1 and flight_readers(proxy) == 5, 30.0)
    finally:
        fake.release()
    results = await asyncio.gather(*jobs)
    assert fake.count() == 1 and len({b for _, _, b in results}) == 1

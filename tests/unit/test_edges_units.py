"""Pure pieces of the edge work: the incremental SSE scanner, the lagging reader, the clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import sse
from proxy.coalesce import Flight, Reader
from proxy.errors import Lagged
from proxy.models import CLOCK, CachedResponse
from proxy.replay import whole
from proxy.status import CacheStatus
from proxy.testing.fake_openai import recorded

STREAMS = [
    "chat_completion_stream_prompt_caching_cache_read",
    "chat_completion_tool_call_streamed",
    "response_stream",
    "response_stream_incomplete",
]


def one_pass(body: bytes) -> tuple[str, object]:
    return sse.verdict(body), sse.usage_of_stream(body)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(STREAMS), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_scanner_fed_in_any_pieces_agrees_with_one_pass(name: str, cuts: list[int]) -> None:
    """Split a recorded real stream anywhere (mid-line, mid-CRLF): same verdict and usage."""
    body = recorded(name)["response"]["body_text"].encode()
    points = sorted({c % (len(body) + 1) for c in cuts})
    scan = sse.Scanner()
    start = 0
    for p in [*points, len(body)]:
        scan.feed(body[start:p])
        start = p
    scan.close()
    assert (scan.verdict(), scan.usage) == one_pass(body)


def test_scanner_sees_a_cut_and_an_error_event() -> None:
    """The SSE scanner names a stream without its terminal event and a stream carrying an error
    event."""
    scan = sse.Scanner()
    scan.feed(b'data: {"choices":[]}\n\n')
    scan.close()
    assert scan.verdict() == "stream ended without its terminal event"
    scan = sse.Scanner()
    scan.feed(b'data: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n')
    scan.close()
    assert scan.verdict() == "stream carried an error event"


async def test_a_reader_that_lags_behind_an_overflowing_flight_is_cut() -> None:
    """Past max_bytes the flight keeps a window; a reader whose chunks left it gets Lagged,
    never a chunk from the wrong place."""
    flight = Flight("k", max_bytes=10)
    slow, fast = flight.attach(), flight.attach()
    flight.publish_head(200, ())
    got_fast = []
    for i in range(2000):
        flight.append(bytes([i % 256]) * 4096)  # 8 MB: past the 4 MB lag window
        async for chunk in _take(fast, 1):
            got_fast.append(chunk)
    assert flight.kept <= 4 * 1024 * 1024 + 4096
    with pytest.raises(Lagged):
        async for _ in slow.chunks():
            pass
    assert [c[0] for c in got_fast] == [i % 256 for i in range(2000)]


async def _take(reader: Reader, n: int) -> AsyncIterator[bytes]:
    it = reader.chunks()
    for _ in range(n):
        yield await asyncio.wait_for(it.__anext__(), 1)


def test_age_uses_the_store_clock() -> None:
    """With Redis's clock ahead of this machine's, Age counts from the store's time."""
    entry = CachedResponse(200, (), b"x", created=time.time() + 100)
    try:
        CLOCK.offset = 130.0
        assert whole(entry, CacheStatus.HIT, "x").headers["Age"] in ("29", "30")
    finally:
        CLOCK.offset = 0.0


def test_stale_if_error_directive_and_window() -> None:
    """The directive is read like max-age (invalid values ignored); the window is the rule's
    option, the directive's, or the smaller of both."""
    from proxy.controls import parse_cache_control

    c = parse_cache_control("max-age=10, stale-if-error=600", None)
    assert c.max_age == 10 and c.stale_if_error == 600
    assert c.stale_window(0) == 600 and c.stale_window(60) == 60 and c.stale_window(6000) == 600
    plain = parse_cache_control("stale-if-error=-5", None)
    assert plain.stale_if_error is None and plain.stale_window(30) == 30


@pytest.mark.parametrize(
    ("base", "path_qs", "expected"),
    [
        ("", "/v1/chat/completions", "/v1/chat/completions"),
        ("/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/", "/v1/models", "/v1/models"),
        ("/api/v1", "/v1/chat/completions", "/api/v1/chat/completions"),
        (
            "/openai",
            "/openai/deployments/d/embeddings?api-version=1",
            "/openai/deployments/d/embeddings?api-version=1",
        ),
        ("/openai", "/v1/chat/completions", "/openai/v1/chat/completions"),
        ("/openai/v1", "/openai/v1/responses", "/openai/v1/responses"),
        ("/openai/v1", "/v1/responses", "/openai/v1/responses"),
        ("/x/v1", "/v1?a=/v1/b", "/x/v1?a=/v1/b"),
        ("/v1x", "/v1/models", "/v1x/v1/models"),  # whole segments only
        ("/gateway", "/v1/models", "/gateway/v1/models"),
    ],
)
def test_the_base_path_is_joined_once(base: str, path_qs: str, expected: str) -> None:
    """The base URL's path, then the request's with what they share left out, never doubled."""
    from proxy.upstream import join_path

    assert join_path(base.rstrip("/"), path_qs) == expected


def test_response_headers_named_in_connection_are_dropped() -> None:
    """An upstream header the answer's Connection header names is hop-by-hop (RFC 9110
    7.6.1): never passed to the client nor stored; the others are kept."""
    from multidict import CIMultiDict

    from proxy.upstream import response_headers

    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Internal-Hop"),
            ("X-Internal-Hop", "upstream-secret-123"),
            ("x-request-id", "req_1"),
            ("Content-Type", "application/json"),
        ]
    )
    assert response_headers(headers) == (
        ("x-request-id", "req_1"),
        ("Content-Type", "application/json"),
    )
    plain = CIMultiDict([("Connection", "keep-alive"), ("x-request-id", "req_2")])
    assert response_headers(plain) == (("x-request-id", "req_2"),)

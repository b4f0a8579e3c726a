"""answers.storable on its own: only whole, sound 200 answers are stored."""

from __future__ import annotations

import pytest

from proxy.answers import UNKNOWN, Verdict, storable, stored_headers
from proxy.coalesce import Flight, Outcome

JSON = (("Content-Type", "application/json"),)
SSE = (("Content-Type", "text/event-stream"),)


def finished(
    status: int,
    headers: tuple[tuple[str, str], ...],
    *chunks: bytes,
    outcome: Outcome = Outcome.COMPLETE,
    expected: int | None = None,
    max_bytes: int = 1 << 20,
) -> Flight:
    flight = Flight("k", max_bytes=max_bytes)
    flight.expected_size = expected
    flight.publish_head(status, headers)
    for chunk in chunks:
        flight.append(chunk)
    flight.finish(outcome)
    return flight


def verdict(flight: Flight, stream: bool) -> Verdict:
    return storable(flight, stream, flight.body())


CHAT_SSE = (
    b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
)


def test_a_whole_json_answer_is_stored_with_its_usage() -> None:
    """A whole JSON answer is storable and its usage is taken from the body."""
    v = verdict(finished(200, JSON, b'{"id":"x","usage":{"prompt_tokens":3}}'), False)
    assert v.ok and v.usage == {"prompt_tokens": 3}


def test_a_whole_stream_is_stored_with_its_usage() -> None:
    """A whole chat stream is storable and its usage is taken from its events."""
    v = verdict(finished(200, SSE, *CHAT_SSE), True)
    assert v.ok and v.usage == {"prompt_tokens": 1, "completion_tokens": 2}


@pytest.mark.parametrize(
    ("flight", "stream", "why"),
    [
        (finished(500, JSON, b'{"error":{}}'), False, ""),
        (finished(200, JSON, b'{"id":'), False, "a JSON answer that does not parse"),
        (
            finished(200, JSON, b'{"error":{"message":"x"}}'),
            False,
            "an error object under a 2xx status",
        ),
        (finished(200, SSE, *CHAT_SSE[:2]), True, "stream ended without its terminal event"),
        (finished(200, JSON, b'{"a":1}', expected=99), False, "length differs from Content-Length"),
        (finished(200, JSON, b'{"a":1}', outcome=Outcome.CUT), False, ""),
        (finished(200, SSE, b"x" * 64, max_bytes=8), True, "above max_record_mb"),
    ],
)
def test_what_is_not_stored(flight: Flight, stream: bool, why: str) -> None:
    """Errors, unparseable or cut answers, streams without their terminal event, wrong lengths and
    oversize answers are not stored, each with its reason."""
    v = verdict(flight, stream)
    assert not v.ok
    assert v.why == why or (why and why in v.why)


def test_other_types_are_taken_as_they_are() -> None:
    """An answer of another content type (audio) is storable as it is, with unknown usage."""
    v = verdict(finished(200, (("Content-Type", "audio/mpeg"),), b"ID3..."), False)
    assert v.ok and v.usage is UNKNOWN


def test_stored_headers_drop_rate_limits_and_the_caches_own() -> None:
    """Stored headers keep the upstream's own headers and drop rate-limit and cache headers."""
    kept = stored_headers(
        (
            ("x-request-id", "r"),
            ("x-ratelimit-remaining-tokens", "9"),
            ("Age", "3"),
            ("Cache-Status", "x"),
        )
    )
    assert kept == (("x-request-id", "r"),)


def test_stored_headers_share_their_strings_between_entries() -> None:
    """Equal names and values of two answers are one object each in the entries (a stored
    answer's headers took more memory than a short answer's body); aiohttp's names, which
    are multidict.istr, are kept as plain strings."""
    from multidict import istr

    def answer(n: int) -> tuple[tuple[str, str], ...]:
        ctype = "".join(["application/", "json"])  # a new object each time, as parsed
        return ((istr("Content-Type"), ctype), ("x-request-id", f"req_{n}"))

    a, b = stored_headers(answer(1)), stored_headers(answer(2))
    assert a == (("Content-Type", "application/json"), ("x-request-id", "req_1"))
    assert type(a[0][0]) is str and a[0][0] is b[0][0] and a[0][1] is b[0][1]
    assert a[1][1] != b[1][1]


@pytest.mark.parametrize("status", [201, 203, 204, 206])
def test_only_a_200_is_stored(status: int) -> None:
    """A 204 (no body) or any other 2xx than 200 is never kept: it would be served as a HIT."""
    body = b"" if status == 204 else b'{"id":"x"}'
    v = verdict(finished(status, JSON, body), False)
    assert not v.ok and v.why == f"status {status}, not 200"

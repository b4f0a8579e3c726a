"""The desync fuzzer's referee (ScriptedUpstream) over a raw socket: which requests it counts
as having crossed an unsolicited answer on the wire, and which reuse it calls a violation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from proxy.testing.desync import Behaviour, Request, ScriptedUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    steps = iter([Behaviour.EXTRA_LATE])

    def behave(_req: Request) -> Behaviour:
        return next(steps, Behaviour.NORMAL)

    up = ScriptedUpstream(behave=behave, late_s=0.02)
    await up.start()
    yield up
    await up.stop()


def chat(fuzz_id: str) -> bytes:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": fuzz_id}]})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        f"X-Fuzz-Id: {fuzz_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def wait_for(condition: object, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the upstream never got there")


async def test_a_crossing_shifts_the_connection_until_the_client_lets_an_answer_arrive(
    upstream: ScriptedUpstream,
) -> None:
    """A request written just after an extra answer crossed it; so did each next request
    written before the answer one behind arrived; reusing the connection well after an
    unsolicited answer is a violation."""
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    writer.write(chat("first"))  # EXTRA_LATE: its answer, then an extra one while idle
    await wait_for(lambda: upstream._extra_at)
    writer.write(chat("second"))  # written before reading the extra: it crossed it
    await wait_for(lambda: len(upstream.requests) == 2)
    writer.write(chat("third"))  # the answer to "second" is one behind: crossed too
    await wait_for(lambda: len(upstream.requests) == 3)
    assert upstream.crossed == {"second", "third"}
    assert upstream.violations == []
    await asyncio.sleep(0.6)  # the answer to "third" came while idle: the cue to close
    writer.write(chat("fourth"))
    await wait_for(lambda: len(upstream.requests) == 4)
    assert upstream.crossed == {"second", "third"}
    assert upstream.violations == ["a connection was used after an unsolicited answer"]
    story = upstream.story({"second"})
    assert story.startswith("connection 1:") and story.count("an answer one behind") == 3
    assert "an extra answer" in story and "fourth" in story
    writer.close()
    await writer.wait_closed()
    del reader


async def test_a_next_request_before_the_extra_crosses_nothing(upstream: ScriptedUpstream) -> None:
    """A next request that reaches the upstream before its extra answer is due stops the
    extra answer: nothing is unsolicited, nothing crossed."""
    upstream.late_s = 1.0  # (a client stalled this long would be too late)
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    writer.write(chat("first"))
    await reader.readuntil(b"\r\n\r\n")
    writer.write(chat("second"))
    await wait_for(lambda: len(upstream.requests) == 2)
    await asyncio.sleep(upstream.late_s + 0.1)  # past when an extra answer was due
    assert upstream.crossed == set()
    assert upstream._extra_at == {}
    assert upstream.violations == []
    writer.close()
    await writer.wait_closed()

"""The desync fuzzer's referee (ScriptedUpstream) over a raw socket: which requests it counts
as having crossed an unsolicited answer on the wire, and which reuse it calls a violation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from proxy.testing import desync
from proxy.testing.desync import Behaviour, Request, ScriptedUpstream, who

NAME = who({"authorization": "Bearer k"})


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    steps = iter([Behaviour.EXTRA_LATE])

    def behave(_req: Request) -> Behaviour:
        return next(steps, Behaviour.NORMAL)

    up = ScriptedUpstream(behave=behave, late_s=0.05)
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


async def until(condition: Callable[[], object], seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the upstream never got there")


async def test_requests_already_there_cross_and_a_later_one_is_a_violation(
    upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extra answer written while the next request was already there is crossed by it;
    the answer to that request then comes one behind, crossed by the request after it if
    that one was there too; a request written after an unsolicited answer arrived is a
    violation (written later than CROSSING_S after it)."""
    monkeypatch.setattr(desync, "_idle", lambda _r, _w: True)  # it misses the next request
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    writer.write(chat("first"))  # EXTRA_LATE: its answer; after late_s, an extra one
    await until(lambda: len(upstream.requests) == 1)
    writer.write(chat("second") + chat("third"))  # both there before the extra is written
    await until(lambda: len(upstream.requests) == 3)
    assert upstream.crossed == {
        "second": f"[who:{NAME}] first",  # the extra answer, to "first"
        "third": f"[who:{NAME}] second",  # the answer to "second", one behind
    }
    assert upstream.violations == []
    await until(lambda: "idle" in upstream.history[1][-1])  # "third"'s answer: nobody waits
    await asyncio.sleep(desync.CROSSING_S + 0.05)
    writer.write(chat("fourth"))
    await until(lambda: len(upstream.requests) == 4)
    assert set(upstream.crossed) == {"second", "third"}
    assert upstream.violations == ["a connection was used after an unsolicited answer"]
    story = upstream.story({"second"})
    assert story.startswith("connection 1:") and story.count("an answer one behind") == 3
    writer.close()
    await writer.wait_closed()
    del reader


async def test_a_request_after_an_extra_answer_arrived_is_a_violation(
    upstream: ScriptedUpstream,
) -> None:
    """A client that writes its next request well after an extra answer reached it kept a
    connection it should have closed: not a crossing, a violation."""
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    writer.write(chat("first"))
    await until(lambda: "an extra answer" in " ".join(upstream.history.get(1, [])))
    await asyncio.sleep(desync.CROSSING_S + 0.05)
    writer.write(chat("second"))
    await until(lambda: len(upstream.requests) == 2)
    assert upstream.crossed == {}
    assert upstream.violations == ["a connection was used after an unsolicited answer"]
    writer.close()
    await writer.wait_closed()
    del reader

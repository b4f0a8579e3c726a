"""The Flight / Reader state machine: late join, overflow, cut, cancel, and the registry."""

from __future__ import annotations

import asyncio

import pytest

from proxy.coalesce import COMPLETE, LAG_BYTES, Flight, Flights, Outcome, Reader
from proxy.errors import Lagged
from proxy.status import Failure


async def read_all(reader: Reader) -> list[bytes]:
    return [chunk async for chunk in reader.chunks()]


async def test_a_late_reader_gets_every_chunk_from_the_first_then_live() -> None:
    """A reader that joins a flight half-way gets every chunk from the first one, then the live
    ones."""
    flight = Flight("k", max_bytes=1 << 20)
    first = flight.attach()
    flight.publish_head(200, (("Content-Type", "text/event-stream"),))
    flight.append(b"a")
    flight.append(b"b")
    late = flight.attach()  # joins half-way
    task = asyncio.ensure_future(read_all(late))
    await asyncio.sleep(0)
    flight.append(b"c")
    flight.finish(Outcome.COMPLETE)
    assert await task == [b"a", b"b", b"c"]
    assert await read_all(first) == [b"a", b"b", b"c"]
    assert flight.body() == b"abc" and flight.size == 3


async def test_wait_head_times_out_on_a_silent_leader_unless_it_is_busy() -> None:
    """Waiting for a head times out on a silent leader but keeps waiting for a busy one."""
    flight = Flight("k", max_bytes=100)
    assert await flight.wait_head(0.01) is None
    flight.busy = True
    waiter = asyncio.ensure_future(flight.wait_head(0.02))
    await asyncio.sleep(0.05)  # past the patience: a busy leader is waited for
    assert not waiter.done()
    flight.publish_head(200, ())
    head = await waiter
    assert head is not None and head.status == 200


async def test_an_ended_flight_without_a_head_answers_none() -> None:
    """A flight that ends before any head wakes its waiters with None and keeps its reason."""
    flight = Flight("k", max_bytes=100)
    waiter = asyncio.ensure_future(flight.wait_head(None))
    await asyncio.sleep(0)
    flight.finish(Outcome.CUT, Failure.UPSTREAM_CUT, "the socket closed")
    assert await waiter is None
    assert flight.reason is Failure.UPSTREAM_CUT and flight.detail == "the socket closed"


async def test_overflow_stops_joiners_and_releases_what_every_reader_passed() -> None:
    """A flight past max_bytes takes no joiners and releases the chunks every reader passed."""
    flight = Flight("k", max_bytes=10)
    reader = flight.attach()
    flight.publish_head(200, ())
    flight.append(b"x" * 8)
    before = flight.joinable
    flight.append(b"y" * 8)  # past max_bytes
    assert before and flight.overflow and not flight.joinable
    chunks = reader.chunks()
    assert await chunks.__anext__() == b"x" * 8
    assert await chunks.__anext__() == b"y" * 8
    flight.append(b"z")  # both chunks passed by the only reader: released
    assert flight.kept == 1 and len(flight.chunks) == 1
    flight.finish(Outcome.COMPLETE)
    assert [c async for c in chunks] == [b"z"]


async def test_a_reader_that_lags_past_the_window_is_cut() -> None:
    """A reader that falls behind by more than the lag window is cut with Lagged."""
    flight = Flight("k", max_bytes=1)
    slow = flight.attach()
    flight.publish_head(200, ())
    piece = b"p" * (LAG_BYTES // 4)
    for _ in range(6):  # 1.5 x the window the flight keeps for laggards
        flight.append(piece)
    flight.finish(Outcome.COMPLETE)
    with pytest.raises(Lagged):
        await read_all(slow)


async def test_a_cut_flight_ends_its_readers_and_is_not_joinable() -> None:
    """A cut flight ends its readers after what they had, is not joinable, and keeps its first
    outcome."""
    flight = Flight("k", max_bytes=100)
    reader = flight.attach()
    flight.publish_head(200, ())
    flight.append(b"a")
    flight.finish(Outcome.CUT, Failure.UPSTREAM_CUT)
    assert await read_all(reader) == [b"a"]
    assert flight.outcome is Outcome.CUT and not flight.joinable
    flight.finish(Outcome.COMPLETE)  # the first outcome stays
    assert flight.outcome is Outcome.CUT


async def test_a_cancelled_reader_leaves_no_waiter_and_detaches() -> None:
    """A cancelled reader leaves no waiter behind and closing it (twice) detaches it from the
    flight."""
    flight = Flight("k", max_bytes=100)
    reader = flight.attach()
    flight.publish_head(200, ())
    task = asyncio.ensure_future(read_all(reader))
    await asyncio.sleep(0)
    assert flight.readers == 1 and len(flight._waiters) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flight._waiters == []
    reader.close()
    reader.close()  # idempotent
    assert flight.readers == 0 and flight.detached_since is not None


async def test_the_registry_forgets_unjoinable_flights_and_debounces() -> None:
    """The flight registry keeps a finished flight for its debounce window, forgets cut ones, and
    lets a new leader replace an old flight."""
    flights = Flights()
    flight = flights.lead("k", max_bytes=100)
    assert flights.get("k") is flight
    flights.forget(flight, after_s=0.02)
    assert flights.get("k") is flight  # reusable for the debounce window
    await asyncio.sleep(0.05)
    assert flights.get("k") is None
    cut = flights.lead("k", max_bytes=100)
    cut.finish(Outcome.CUT)
    assert flights.get("k") is None and len(flights) == 0
    again = flights.lead("k", max_bytes=100)
    newer = flights.lead("k", max_bytes=100)  # a new leader replaces the old flight
    flights.forget(again)
    assert flights.get("k") is newer


def test_a_flight_read_whole_releases_nothing_past_max_bytes() -> None:
    """A flight its leading handler reads whole (Flight.whole) keeps every chunk past
    max_bytes (it overflows: not stored, no joiners), so the leader can still send it all."""
    flight = Flight("k", max_bytes=10)
    flight.whole = True
    reader = flight.attach()
    flight.publish_head(200, ())
    for _ in range(LAG_CHUNKS):
        flight.append(b"x" * (1024 * 1024))
    flight.finish(COMPLETE)
    assert flight.overflow and not flight.joinable
    assert len(flight.chunks) == LAG_CHUNKS and flight.kept == LAG_CHUNKS * 1024 * 1024
    reader.close()


LAG_CHUNKS = LAG_BYTES // (1024 * 1024) + 2
"""More 1 MB chunks than the lag window: a flight that is not read whole would drop some."""


def test_a_finished_flight_joins_its_body_once() -> None:
    """While chunks arrive, body() is what has come so far; once the flight is done with
    nothing let go, every caller (the stored entry, the leader's reply) gets one copy."""
    flight = Flight("k", max_bytes=1024)
    flight.publish_head(200, ())
    flight.append(b"ab")
    assert flight.body() == b"ab"
    flight.append(b"cd")
    flight.finish(COMPLETE)
    body = flight.body()
    assert body == b"abcd" and flight.body() is body

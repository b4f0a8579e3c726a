"""In-flight answers and single flight per key.

A `Flight` is one upstream answer being received: its head (status, headers), then its chunks
as they arrive. The upstream read (fetch.py) appends to the flight; every client
asking for that answer, the one that started it (the leader) and every identical request that
joined later, reads the flight from its first chunk and then follows it live. So:

- a duplicate that joins half-way gets the whole answer from byte 0, then the rest live;
- a client that hangs up (leader or not) stops only its own reader: the upstream read goes on
  for the others and for the cache (bounded by `detached_max_s` once nobody reads);
- a slow reader only lags behind in the shared chunk list; it never slows the upstream read
  nor the other readers. A flight above `max_bytes` stops taking new joiners and is not stored,
  and chunks every reader has passed are released, so memory per flight stays bounded;
- an upstream error is an answer like any other (its status and body reach every reader) and is
  never stored; a fetch task that raises or is cancelled ends the flight as `CUT`, so no reader
  ever waits on a flight that will not finish.

Limits: this registry is per process. Identical requests that reach different processes or
instances are merged only where a shared store provides a cross-instance flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import AsyncIterator
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from proxy.errors import GivenUp, Lagged
from proxy.models import CachedResponse
from proxy.sse import Scanner
from proxy.status import Failure

if TYPE_CHECKING:
    from proxy.http1 import Response

LAG_BYTES = 4 * 1024 * 1024
"""Least a reader of an overflowing flight may lag behind the upstream before it is cut."""
WHOLE_READ_MAX = 64 * 1024 * 1024
"""Largest answer a handler reads whole before relaying it (Flight.whole); past it the read
is cut, so a broken upstream cannot make one answer hold more."""


class Outcome(Enum):
    PENDING = "pending"
    COMPLETE = "complete"
    """The upstream answer ended as a whole (it may still be an error status)."""
    CUT = "cut"
    """The answer broke off: readers must show their client a cut, nothing is stored."""


PENDING, COMPLETE, CUT = Outcome.PENDING, Outcome.COMPLETE, Outcome.CUT
"""The members as module names, for the data path: in Python 3.11 every read of an Enum
member through its class costs about 0.17 us (EnumType's __getattr__ puts each class
attribute read on a slow path), and a request reads them a dozen times."""
TOO_LARGE, CLIENTS_LEFT = Failure.TOO_LARGE, Failure.CLIENTS_LEFT


class Head(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]


class Flight:
    """One upstream answer in progress, shared by every reader of its key."""

    __slots__ = (
        "_base",
        "_positions",
        "_waiters",
        "busy",
        "chunk_ms",
        "chunks",
        "detached_since",
        "detail",
        "done",
        "entry",
        "expected_size",
        "fingerprint",
        "form",
        "head",
        "head_at",
        "kept",
        "key",
        "max_bytes",
        "outcome",
        "overflow",
        "readers",
        "reason",
        "rebase",
        "scan",
        "size",
        "task",
        "upstream_ms",
        "whole",
        "whole_body",
    )

    def __init__(self, key: str, *, max_bytes: int, fingerprint: str = "") -> None:
        self.key = key
        self.fingerprint = fingerprint
        """For Idempotency-Key flights: the request the key was first used with."""
        self.form = ""
        """The form its answer comes in ("json", "sse", "sse+usage"; "" when not a twin): an
        Idempotency-Key flight is shared by every form of its request."""
        self.max_bytes = max_bytes
        self.scan: Scanner | None = None
        """An SSE answer's checks (framing, terminal event, usage), fed as chunks arrive."""
        self.busy = False
        """The leader has its answer and is working on it (rehosting images): waiters keep
        waiting; the lock timeout is for a silent leader."""
        self.rebase = False
        """The answer holds image links under PLACEHOLDER_BASE: each reader rebases it."""
        self.expected_size: int | None = None
        """The upstream's Content-Length (unencoded answers): a body of another size is cut."""
        self.head: Head | None = None
        self.head_at = 0.0
        self.chunks: list[bytes] = []
        self.chunk_ms = array("d")
        """When each chunk arrived, ms after the head (8 bytes a chunk; a float is 32)."""
        self.size = 0
        self.kept = 0
        """Bytes of the chunks still held (all of them until the flight overflows)."""
        self.whole = False
        """Read whole by its leading handler before anyone relays it (fetch.py): nothing is
        released past max_bytes, since the leader relays from the first byte afterwards
        (the read is capped at WHOLE_READ_MAX instead)."""
        self.whole_body: bytes | None = None
        """The body, joined once when the flight ended COMPLETE with nothing let go (under
        max_bytes): the stored entry, the leading handler's reply and late joiners share it."""
        self.outcome = PENDING
        self.done = False
        """The outcome is no longer PENDING (a plain attribute: read on every chunk)."""
        self.overflow = False
        self.readers = 0
        self.detached_since: float | None = time.monotonic()
        self.reason: Failure | None = None
        """Why the flight failed: the proxy answered for the upstream (a PROXY_FAILURES code,
        outcome COMPLETE) or the answer broke off (outcome CUT); None for an answer as it came."""
        self.detail = ""
        """What went wrong, in words, beside `reason` (bounded where it is logged)."""
        self.task: asyncio.Task[Any] | None = None
        """The work on this flight: the upstream read feeding it (its own task, or for a
        whole chat or Responses answer the leading client's handler, which reads it inline),
        then the task storing its answer, if keeping it takes one (fetch.Fetcher.keep)."""
        self.upstream_ms = 0.0
        """How long the upstream read took (set by the fetcher when it ends)."""
        self.entry: CachedResponse | None = None
        """Set once a good answer is whole: late joiners and debounce reuse it as is."""
        self._base = 0  # how many leading chunks were released (overflow only)
        self._positions: dict[int, int] = {}
        self._waiters: list[asyncio.Future[None]] = []
        """Readers (and head waiters) parked until the next change: a future each, made
        only when one waits (an Event per flight and per change cost a stream 1 KB)."""

    # -- writer side (the fetch task) -------------------------------------------------------
    def publish_head(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self.head = Head(status, headers)
        if 200 <= status < 300 and any(
            k.lower() == "content-type" and "text/event-stream" in v.lower() for k, v in headers
        ):
            self.scan = Scanner()
        self.head_at = time.monotonic()
        self._wake()

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.chunks.append(chunk)
        self.chunk_ms.append((time.monotonic() - self.head_at) * 1000.0)
        self.size += len(chunk)
        self.kept += len(chunk)
        if self.size > self.max_bytes and not self.overflow:
            self.overflow = True
            self.scan = None  # not stored: no need to check it
        if self.overflow and not self.whole:
            self._release()
        elif self.scan is not None:
            self.scan.feed(chunk)
        self._wake()

    def finish(self, outcome: Outcome, reason: Failure | None = None, detail: str = "") -> None:
        """End the flight (the first end stays): COMPLETE, or CUT with its reason."""
        if self.done:
            return
        self.outcome = outcome
        self.done = True
        self.reason = reason
        self.detail = detail
        if outcome is COMPLETE and not self.overflow and self._base == 0:
            self.whole_body = b"".join(self.chunks)
        self._wake()

    async def feed(
        self, resp: Response, headers: tuple[tuple[str, str], ...], detached_max_s: float
    ) -> None:
        """The writer side in one call: the upstream answer's head (`headers`: those a client
        may see), then each chunk as it arrives, then the end. Raises UpstreamError (a cut
        body), or GivenUp past a limit (a whole read past WHOLE_READ_MAX, nobody reading for
        detached_max_s); the caller ends the flight then. A flight read whole by its handler
        is never given up for want of readers: that handler reads it."""
        if "Content-Encoding" not in resp.headers:
            self.expected_size = resp.content_length
        self.publish_head(resp.status, headers)
        async for chunk in resp.iter_any():
            self.append(chunk)
            if self.whole:
                if self.size > WHOLE_READ_MAX:
                    raise GivenUp("the answer is larger than a whole answer may be", TOO_LARGE)
            elif (
                self.detached_since is not None
                and time.monotonic() - self.detached_since > detached_max_s
            ):
                raise GivenUp("every client left and detached_max_s passed", CLIENTS_LEFT)
        self.finish(COMPLETE)

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def changed(self) -> None:
        """Until the next head, chunk or end."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:  # cancelled or timed out: not left behind for the next wake
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Past max_bytes: drop the chunks every reader has passed, and beyond that keep at
        most max(max_bytes, LAG_BYTES) for readers that lag (one that falls out is cut)."""
        low = min(self._positions.values(), default=self._base + len(self.chunks))
        drop = freed = 0
        window = max(self.max_bytes, LAG_BYTES)
        while drop < len(self.chunks) and (self._base + drop < low or self.kept - freed > window):
            freed += len(self.chunks[drop])
            drop += 1
        if drop:
            del self.chunks[:drop]
            del self.chunk_ms[:drop]
            self._base += drop
            self.kept -= freed

    # -- reader side (one per client) -------------------------------------------------------
    @property
    def joinable(self) -> bool:
        """A new reader can still get the whole answer from its first byte."""
        return not self.overflow and self.outcome is not CUT

    async def wait_head(self, patience_s: float | None) -> Head | None:
        """The head, or None if the flight ended without one or `patience_s` of silence passed
        first (a leader that is `busy` is not silent: the wait goes on)."""
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while self.head is None and not self.done:
            if deadline is None:
                await self.changed()
                continue
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.changed()
            except TimeoutError:
                if not self.busy:
                    return None
                deadline = time.monotonic() + (patience_s or 0.0)
        return self.head

    def attach(self) -> Reader:
        """A reader positioned at the first chunk; close it when the client is done."""
        return Reader(self)

    def _attach(self, token: object) -> None:
        self.readers += 1
        self._positions[id(token)] = self._base
        self.detached_since = None

    def _detach(self, token: object) -> None:
        if self._positions.pop(id(token), None) is None:
            return
        self.readers -= 1
        if self.readers == 0:
            self.detached_since = time.monotonic()

    def body(self) -> bytes:
        """The chunks held, joined (whole_body once the flight ended whole)."""
        whole = self.whole_body
        return whole if whole is not None else b"".join(self.chunks)


class Flights:
    """The registry of flights in this process: at most one joinable flight per key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def readers(self) -> int:
        """Requests now reading these flights through a Reader: joiners and followers, and a
        leader that relays through one (one that reads a whole JSON answer itself does not).
        Safe from another thread: list() copies the flights in one step under the GIL."""
        return sum(f.readers for f in list(self._flights.values()))

    def get(self, key: str) -> Flight | None:
        flight = self._flights.get(key)
        if flight is not None and not flight.joinable:
            self.forget(flight)
            return None
        return flight

    def lead(self, key: str, *, max_bytes: int, fingerprint: str = "") -> Flight:
        """A new flight for `key`, registered in place of any other."""
        flight = Flight(key, max_bytes=max_bytes, fingerprint=fingerprint)
        self.forget_key(key)
        self._flights[key] = flight
        return flight

    def take(
        self, key: str, *, share: bool, max_bytes: int, fingerprint: str = ""
    ) -> tuple[Flight, bool]:
        """The key's flight for one request: (the joinable flight in progress, False), else
        (a new flight it leads, True), registered for others to join when `share`."""
        flight = self._flights.get(key) if share else None
        if flight is not None:
            if flight.joinable:
                return flight, False
            self.forget(flight)
        flight = Flight(key, max_bytes=max_bytes, fingerprint=fingerprint)
        if share:  # (nothing is registered under the key now, nor timed)
            self._flights[key] = flight
        return flight, True

    def forget(self, flight: Flight, after_s: float = 0.0) -> None:
        """Drop the flight from the registry, now or after a debounce window."""
        if self._flights.get(flight.key) is not flight:
            return
        if after_s <= 0:
            self.forget_key(flight.key)
            return
        loop = asyncio.get_running_loop()
        self._timers[flight.key] = loop.call_later(after_s, self._expire, flight)

    def _expire(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
            self._timers.pop(flight.key, None)

    def forget_key(self, key: str) -> None:
        self._flights.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()


class Reader:
    """One client's position in a flight. Attached from creation, so nothing it still needs
    is released; `close()` (idempotent) lets go."""

    __slots__ = ("flight", "pos")

    def __init__(self, flight: Flight) -> None:
        self.flight = flight
        self.pos = flight._base
        flight._attach(self)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every chunk from the first, then live ones, until the flight ends. Raises Lagged
        if this reader fell so far behind an overflowing flight that its chunks were let go."""
        f = self.flight
        while True:
            while True:
                index = self.pos - f._base
                if index < 0:  # released while this client lagged: never index from the end
                    raise Lagged("this client read too slowly: its part of the answer was let go")
                if index >= len(f.chunks):
                    break
                chunk = f.chunks[index]
                self.pos += 1
                f._positions[id(self)] = self.pos
                yield chunk
            if f.done:
                return
            await f.changed()

    def close(self) -> None:
        self.flight._detach(self)

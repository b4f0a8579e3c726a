"""The upstream read behind a flight: upstream -> Flight -> store.

An answer is read in its own task, detached from any client, so it goes at the upstream's
pace whatever any client's. A whole (non-streamed) chat or Responses answer led by this
process is read by the handler of the request that started it (a task fewer per MISS):
aiohttp does not cancel a handler whose client hangs up, so that read too goes to the end
for the readers that remain and for the cache. Keeping the answer (keep) waits for nothing
where the store allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog
from multidict import CIMultiDict

from proxy.answers import Verdict, make_entry, storable
from proxy.bus import Followed, RedisBus
from proxy.cache import Cache
from proxy.coalesce import COMPLETE, CUT, Flight, Flights
from proxy.cost import Prices
from proxy.errors import (
    BusError,
    FailureAnswer,
    StoreUnavailable,
    UpstreamError,
    cut_reason,
    failure_answer,
)
from proxy.images.base import has_placeholder
from proxy.keys import key_id
from proxy.models import CachedResponse
from proxy.record import bounded
from proxy.status import Failure
from proxy.tasks import spawn
from proxy.upstream import Upstream, response_headers

if TYPE_CHECKING:
    from proxy.upstream import Response

log = structlog.get_logger()

JSON_HEADERS = (("Content-Type", "application/json"),)
CANCELLED = Failure.CANCELLED  # a module name: see coalesce.PENDING

# A hook that may rewrite a whole non-streamed 2xx body before anyone sees it (image rehosting).
# It returns the new body, or None to leave the answer as it is and not store it.
Transform = Callable[[bytes, "FetchJob"], Awaitable[bytes | None]]


@dataclass(slots=True)
class FetchJob:
    """One upstream request and what to do with its answer."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    route: str
    stream: bool
    store_key: str = ""
    """Where to store a good answer; "" stores nothing."""
    ttl_s: float = 0.0
    """How long the answer is fresh."""
    keep_s: float = 0.0
    """How much longer it is kept, stale, for stale-if-error."""
    debounce_s: float = 0.0
    transform: Transform | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    public_base: str = ""
    """Base URL of links to images the proxy serves: --public-url, or PLACEHOLDER_BASE, which
    each reader's own base replaces on the way out."""
    on_stored: Callable[[CachedResponse], Coroutine[Any, Any, None]] | None = None
    """Run (in its own task) once the answer is stored: the semantic layer indexes it."""


def proxy_error(flight: Flight, answer: FailureAnswer, detail: str = "") -> None:
    """End a flight that has no head yet with the proxy's own answer for its failure."""
    flight.publish_head(answer.status, JSON_HEADERS)
    flight.append(answer.body)
    flight.finish(COMPLETE, answer.code, detail)


class Fetcher:
    """Starts the upstream read for a flight and stores what came back whole and good."""

    def __init__(
        self,
        upstream: Upstream,
        cache: Cache,
        flights: Flights,
        *,
        detached_max_s: float,
        prices: Prices | None = None,
        image_timeout_s: float = 15.0,
    ) -> None:
        self.prices = prices or Prices()
        self.image_timeout_s = image_timeout_s
        self.upstream = upstream
        self.cache = cache
        self.flights = flights
        self.detached_max_s = detached_max_s

    def start(self, flight: Flight, job: FetchJob) -> None:
        flight.task = spawn(self.fetch(flight, job, keep=True), name=f"fetch:{flight.key[:15]}")

    def lead_shared(self, bus: RedisBus, flight: Flight, job: FetchJob, token: str) -> None:
        """Lead across instances: fetch, and mirror the flight to the bus for the others."""
        spawn(bus.mirror(flight, flight.key, token), name=f"mirror:{key_id(flight.key)}")
        self.start(flight, job)

    def follow(self, bus: RedisBus, flight: Flight, job: FetchJob) -> None:
        """Feed `flight` from another instance's leader; take over if that leader dies."""
        flight.task = spawn(
            self._follow_safe(bus, flight, job), name=f"follow:{key_id(flight.key)}"
        )

    async def _follow_safe(self, bus: RedisBus, flight: Flight, job: FetchJob) -> None:
        """_follow, and whatever goes wrong in it the flight is fed or finished (fail open)."""
        try:
            await self._follow(bus, flight, job)
        except asyncio.CancelledError:
            flight.finish(CUT, CANCELLED)
            self.flights.forget(flight)
            raise
        except Exception as exc:
            log.warning("bus.follow_failed", key=key_id(flight.key), error=type(exc).__name__)
            if flight.head is None and not flight.done:
                self.start(flight, job)  # nothing reached a client yet: fetch it ourselves
            else:
                flight.finish(CUT, Failure.FOLLOW_FAILED, type(exc).__name__)
                self.flights.forget(flight)

    async def _follow(self, bus: RedisBus, flight: Flight, job: FetchJob) -> None:
        key = flight.key
        while True:
            try:
                result = await bus.follow(flight, key)
            except BusError:
                result = Followed.BUS_FAILED
            if result is Followed.DONE:
                head = flight.head
                if flight.outcome is COMPLETE and head is not None and head.status < 300:
                    stream = job.stream or flight.scan is not None
                    flight.entry = make_entry(
                        flight, job, stream=stream, body=flight.body(), prices=self.prices
                    )
                self.flights.forget(flight)
                return
            token: str | None = None
            if result is Followed.ORPHANED:
                log.warning("coalesce.leader_lost", key=key_id(key))
                try:
                    token = await bus.try_lead(key, flight.fingerprint)
                except BusError:
                    result = Followed.BUS_FAILED
            if flight.head is None:
                # Nothing reached our clients yet: fetch into this very flight, seamlessly.
                if token is not None:
                    self.lead_shared(bus, flight, job, token)
                    return
                if result is Followed.BUS_FAILED:
                    self.start(flight, job)
                    return
                continue  # another instance took over: follow its new stream
            # Our clients already have part of the lost answer: they get a cut; the one
            # instance that won the lease fetches again for newcomers and the cache.
            flight.finish(CUT, Failure.LEADER_LOST, "the leading instance was lost")
            self.flights.forget(flight)
            if token is not None:
                fresh = self.flights.lead(key, max_bytes=flight.max_bytes)
                self.lead_shared(bus, fresh, job, token)
            return

    async def fetch(self, flight: Flight, job: FetchJob, *, keep: bool = False) -> Read:
        """Read the upstream answer into the flight and finish it; never raises (but for
        cancellation): a failure ends the flight with the proxy's answer or as a cut. As a
        flight's own task (start()), `keep`: then keep() it, and the task ends there (a store
        that takes writes without waiting lets the flight go at once). A handler may await
        this itself (a non-streamed answer has no client to keep pace with, and aiohttp does
        not cancel a handler whose client hangs up), then call keep(). The answer itself
        goes into the flight through Flight.feed (its whole writer side, one call: a stream
        holds two frames here, a few hundred bytes each, not one per step)."""
        started = time.monotonic()
        read = Read(stream=job.stream, keep=True)
        try:
            # The request is out and its answer's head has not come: the leader is working,
            # not silent (followers wait up to the read timeout, not the lock timeout).
            flight.busy = True
            async with self.upstream.request(
                job.method, job.path_qs, job.headers, job.body
            ) as resp:
                flight.busy = False
                headers = response_headers(resp.headers)
                ctype = resp.headers.get("Content-Type", "")
                stream = job.stream or "text/event-stream" in ctype
                if job.transform is not None and 200 <= resp.status < 300 and not stream:
                    read = await self._rehost(flight, job, resp.status, headers, resp)
                else:
                    await flight.feed(resp, headers, self.detached_max_s)
                    read = Read(stream=stream, keep=True)
        except asyncio.CancelledError:
            flight.finish(CUT, CANCELLED)
            self.flights.forget(flight)
            raise
        except Exception as exc:  # UpstreamError, or a bug: the readers get the proxy's answer
            _failed(flight, exc)
        finally:
            flight.busy = False
            if not flight.done:  # (a BaseException other than cancellation)
                flight.finish(CUT, Failure.PROXY_FAILURE, "the upstream read ended early")
        flight.upstream_ms = (time.monotonic() - started) * 1000.0
        if flight.outcome is CUT and flight.head is not None and flight.head.status < 400:
            log.warning(
                "stream.aborted",
                key=key_id(flight.key),
                reason=flight.reason,
                detail=bounded(flight.detail, 200),
            )
        if keep:
            self.keep(flight, job, read)
        return read

    async def _rehost(
        self,
        flight: Flight,
        job: FetchJob,
        status: int,
        headers: tuple[tuple[str, str], ...],
        resp: Response,
    ) -> Read:
        """An image answer, read whole and its image links rehosted before anyone sees it."""
        assert job.transform is not None
        data = await resp.read()
        flight.busy = True  # the leader works: duplicates keep waiting for it
        try:
            new = await asyncio.wait_for(job.transform(data, job), self.image_timeout_s)
        except TimeoutError:
            log.warning("image.rehost_failed", reason="image_timeout_s passed")
            new = None
        finally:
            flight.busy = False
        if new is not None:
            data = new
            flight.rebase = has_placeholder(data)
        flight.publish_head(status, headers)
        flight.append(data)
        flight.finish(COMPLETE)
        return Read(stream=False, keep=new is not None)

    def keep(self, flight: Flight, job: FetchJob, read: Read) -> None:
        """Store the answer if it is whole and good; then let the flight go (or debounce).
        Without a task where nothing waits: a small answer is checked on the loop and goes to
        a store that takes writes without waiting (memory, SQLite's batches), unless
        something is to run once it is stored. Otherwise a task does the rest."""
        body = _good_body(flight)
        if len(body) > VERDICT_OFF_LOOP:  # (flight.task: the work on it goes on in this task)
            large = self._keep_large(flight, job, read, body)
            flight.task = spawn(large, name=f"keep:{key_id(flight.key)}")
            return
        entry = self._entry(flight, job, read, body, storable(flight, read.stream, body))
        if entry is None:
            self.flights.forget(flight)
            return
        if job.store_key and read.keep:
            ttl_s = job.ttl_s + job.keep_s
            if job.on_stored is not None or not self.cache.put(job.store_key, entry, ttl_s):
                store = self._store(flight, job, read, entry)
                flight.task = spawn(store, name=f"store:{key_id(flight.key)}")
                return
        self.flights.forget(flight, after_s=job.debounce_s if read.keep else 0.0)

    async def _keep_large(self, flight: Flight, job: FetchJob, read: Read, body: bytes) -> None:
        """keep() for an answer over VERDICT_OFF_LOOP: parsing it would stall the loop."""
        verdict = await asyncio.to_thread(storable, flight, read.stream, body)
        entry = self._entry(flight, job, read, body, verdict)
        if entry is None:
            self.flights.forget(flight)
            return
        await self._store(flight, job, read, entry)

    async def _store(
        self, flight: Flight, job: FetchJob, read: Read, entry: CachedResponse
    ) -> None:
        if job.store_key and read.keep:
            try:
                await self.cache.set(job.store_key, entry, job.ttl_s + job.keep_s)
                if job.on_stored is not None:
                    spawn(job.on_stored(entry), name=f"stored:{key_id(job.store_key)}")
            except StoreUnavailable:
                pass
        self.flights.forget(flight, after_s=job.debounce_s if read.keep else 0.0)

    def _entry(
        self, flight: Flight, job: FetchJob, read: Read, body: bytes, verdict: Verdict
    ) -> CachedResponse | None:
        """The flight's entry (also set on the flight) if the verdict lets it be stored. An
        answer the proxy fails to make an entry of is not stored (the upstream's bytes are
        not the proxy's to trust): raising here would leave its flight registered, joined
        by every later duplicate."""
        if not verdict.ok:
            if verdict.why:
                event = "stream.not_stored" if flight.overflow else "answer.not_stored"
                log.info(event, key=key_id(flight.key), reason=verdict.why)
            return None
        try:
            entry = make_entry(
                flight, job, stream=read.stream, body=body, prices=self.prices, usage=verdict.usage
            )
        except Exception as exc:
            why = f"no entry could be made: {type(exc).__name__}"
            log.warning("answer.not_stored", key=key_id(flight.key), reason=why)
            return None
        flight.entry = entry
        return entry


VERDICT_OFF_LOOP = 256 * 1024
"""Answers larger than this are checked (parsed) on a worker thread."""


def _failed(flight: Flight, exc: Exception) -> None:
    """End a flight whose upstream read failed: with the proxy's answer if nothing reached a
    client yet, else as a cut."""
    if not isinstance(exc, UpstreamError):
        log.exception("fetch.failed", key=key_id(flight.key))
    detail = str(exc) if isinstance(exc, UpstreamError) else type(exc).__name__
    if flight.head is None:
        proxy_error(flight, failure_answer(exc), detail)
    else:
        flight.finish(CUT, cut_reason(exc), detail)


def _good_body(flight: Flight) -> bytes:
    """The flight's body if it may be stored at all (a whole 2xx under the limit), else b""."""
    head, body = flight.head, flight.whole_body
    return body if body is not None and head is not None and 200 <= head.status < 300 else b""


class Read(NamedTuple):
    """What an upstream read turned out to be (the fetcher's result; its job is not changed)."""

    stream: bool
    """An SSE answer (asked for, or sent as one anyway)."""
    keep: bool
    """It may be stored and reused (False: its images could not be rehosted)."""

"""Bytes to the client: one write loop (pump) for a flight, a pass-through answer, a stored
answer in pieces or at its recorded pace. Every write is under the write timeout; a client
that is gone is noted, one that takes nothing (or lags behind an overflowing flight) is
dropped at once; an answer that broke off upstream is cut (no closing chunk)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from aiohttp import web
from multidict import CIMultiDict

from proxy.coalesce import CUT, Flight, Reader
from proxy.errors import Lagged, UpstreamError, json_error
from proxy.images.base import client_base, rebase
from proxy.models import CachedResponse
from proxy.record import Record, bounded
from proxy.replay import headers_of
from proxy.rules import Rule
from proxy.status import PROXY_FAILURES, CacheStatus, Failure, mark

UPSTREAM_FAILED, UPSTREAM_CUT = Failure.UPSTREAM_FAILED, Failure.UPSTREAM_CUT  # see PENDING
WHOLE_MAX = 1024 * 1024
"""Answers up to this size are handed to aiohttp whole; larger ones are written piece by piece
under the write timeout, so a client that reads nothing pins at most a socket buffer's worth."""
PIECE = 256 * 1024
"""A large stored answer is written in pieces of this size."""
ROOMY = 16 * 1024
"""A write that leaves the client's send buffer under this cannot wait for the client (the
transport pauses writers past its high-water mark, 64 KB): it goes without a timer."""


async def pump(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    chunks: AsyncIterable[bytes | memoryview],
    rec: Record,
    patience_s: float,
) -> bool:
    """The write loop: every chunk to the client, each under `patience_s`; the bytes and
    chunks written go on the line. False if the client went away or was dropped (taking
    nothing, or lagging behind an overflowing flight). Upstream errors propagate."""
    nbytes = count = 0
    try:
        async for chunk in chunks:
            await write(request, resp, chunk, patience_s)
            nbytes += len(chunk)
            count += 1
    except UpstreamError:
        rec.bytes, rec.chunks = nbytes, count
        raise
    except ConnectionResetError:
        rec.client_gone = True
    except (TimeoutError, Lagged):
        rec.client_dropped = True
        drop(request)
    else:
        rec.bytes, rec.chunks = nbytes, count
        return True
    rec.bytes, rec.chunks = nbytes, count
    return False


async def write(
    request: web.BaseRequest, resp: web.StreamResponse, chunk: bytes | memoryview, patience_s: float
) -> None:
    """Write one chunk to the client; TimeoutError if it takes nothing for `patience_s`. Most
    writes cannot wait, and skip the timer (one per chunk cost a stream about 1 KB)."""
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(chunk) <= ROOMY:
        await resp.write(chunk)
        return
    async with asyncio.timeout(patience_s):
        await resp.write(chunk)


async def relay(
    request: web.BaseRequest,
    rec: Record,
    flight: Flight,
    reader: Reader | None,
    label: CacheStatus,
    t0: float,
    write_timeout: float,
) -> web.StreamResponse:
    """Send a flight to one client: from its first chunk, then live; show a cut as a cut.
    `reader`: this client's place in the flight, attached when it joined (so nothing it needs
    is let go); None for the handler that read the flight whole, which attaches one only if
    the answer is too large to hand over at once. Closed here in every case."""
    try:
        head = flight.head
        if head is None:
            rec.error = UPSTREAM_FAILED
            detail = bounded(flight.detail or str(flight.reason), 200)
            message = f"The upstream answer failed: {detail}"
            return json_error(502, message, "proxy_error", UPSTREAM_FAILED)
        if flight.reason in PROXY_FAILURES:
            rec.error = flight.reason  # the 502/504 is the proxy's own answer
        headers: CIMultiDict[str] = CIMultiDict(head.headers)
        mark(headers, label)
        body = flight.whole_body
        if body is not None and not flight.rebase and len(body) <= WHOLE_MAX:
            rec.chunks = len(flight.chunks)
            return web.Response(status=head.status, headers=headers, body=body)
        if reader is None:
            reader = flight.attach()
        if flight.rebase:  # a small image answer: whole, with links under this client's base
            body = b"".join([chunk async for chunk in reader.chunks()])
            body = rebase(body, request_base(request))
            return web.Response(status=head.status, headers=headers, body=body)
        resp = web.StreamResponse(status=head.status, headers=headers)
        if body is not None:
            resp.content_length = len(body)
        await resp.prepare(request)
        rec.ttfb_ms = round((time.perf_counter() - t0) * 1000.0, 2)
        if not await pump(request, resp, reader.chunks(), rec, write_timeout):
            return resp
        if flight.outcome is CUT:
            rec.cut, rec.cut_detail = flight.reason or UPSTREAM_CUT, flight.detail
            cut(request)
            return resp
        await resp.write_eof()
        return resp
    finally:
        if reader is not None:
            reader.close()


async def in_pieces(
    request: web.BaseRequest,
    rec: Record,
    entry: CachedResponse,
    status: CacheStatus,
    cache_status: str,
    write_timeout: float,
) -> web.StreamResponse:
    """A large stored answer, whole but written PIECE by PIECE: a client that reads nothing
    holds a socket buffer's worth, not a copy of the answer."""
    data = memoryview(entry.body)
    resp = web.StreamResponse(status=entry.status, headers=headers_of(entry, status, cache_status))
    resp.content_length = len(data)
    await resp.prepare(request)
    pieces = (data[start : start + PIECE] for start in range(0, len(data), PIECE))
    if await pump(request, resp, _aiter(pieces), rec, write_timeout):
        await resp.write_eof()
    return resp


async def paced(
    request: web.BaseRequest,
    rec: Record,
    entry: CachedResponse,
    rule: Rule,
    status: CacheStatus,
    cache_status: str,
    write_timeout: float,
) -> web.StreamResponse:
    """A stored stream at its recorded pace (the rule's `replay`, sped up by replay_speed)."""
    resp = web.StreamResponse(status=entry.status, headers=headers_of(entry, status, cache_status))
    await resp.prepare(request)
    if await pump(request, resp, _at_pace(entry, rule), rec, write_timeout):
        await resp.write_eof()
    return resp


async def _at_pace(entry: CachedResponse, rule: Rule) -> AsyncIterator[bytes]:
    """The stored chunks, each when it came (relative to the first), sped up."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for chunk, at_ms in zip(entry.chunks(), entry.chunk_ms, strict=False):
        delay = start + at_ms / 1000.0 / rule.replay_speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk


async def _aiter(chunks: Iterable[memoryview]) -> AsyncIterator[memoryview]:
    for chunk in chunks:
        yield chunk


def request_base(request: web.BaseRequest) -> str:
    """The base URL this client reached the proxy at, for links to images the proxy serves."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    fallback = "http://127.0.0.1"
    if isinstance(sock, tuple) and len(sock) >= 2:
        host = f"[{sock[0]}]" if ":" in str(sock[0]) else str(sock[0])
        fallback = f"http://{host}:{sock[1]}"
    return client_base(request.scheme, request.headers.get("Host"), fallback)


def drop(request: web.BaseRequest) -> None:
    """Drop a client that takes nothing: at once, freeing what its socket still buffers."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def cut(request: web.BaseRequest) -> None:
    """End the connection without the closing chunk, so the client sees the stream broke off."""
    transport = request.transport
    if transport is not None:
        transport.close()

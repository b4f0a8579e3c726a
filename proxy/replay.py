"""CachedResponse -> the client's response, with the original framing and bytes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.models import CLOCK, CachedResponse
from proxy.rules import Rule
from proxy.status import HIT, HIT_CACHE_STATUS, STALE, CacheStatus

PIECE = 256 * 1024


def whole(
    entry: CachedResponse, status: CacheStatus, cache_status: str, body: bytes | None = None
) -> web.Response:
    """A stored answer as one response (the fast replay, and every non-stream answer);
    `body` replaces the stored one (an answer rebased for its client)."""
    if body is None and status is HIT and cache_status == HIT_CACHE_STATUS:  # the plain HIT
        headers = (*entry.hit_headers, ("Age", age_of(entry)))
        return web.Response(status=entry.status, body=entry.body, headers=headers)
    resp = web.Response(status=entry.status, body=entry.body if body is None else body)
    _headers(resp, entry, status, cache_status)
    return resp


def _headers(resp: web.StreamResponse, entry: CachedResponse, status: CacheStatus, cs: str) -> None:
    headers = resp.headers
    if status is HIT and cs == HIT_CACHE_STATUS:  # prebuilt for the plain HIT
        headers.extend(entry.hit_headers)
        headers.add("Age", age_of(entry))
        return
    headers.extend(entry.headers)
    headers.add("X-Cache-Status", status.header)
    headers.add("Cache-Status", cs)
    if status in (STALE, HIT):
        headers.add("Age", age_of(entry))


def age_of(entry: CachedResponse) -> str:
    """The Age header of a stored answer: whole seconds since it was stored."""
    return str(max(0, int(CLOCK.now() - entry.created)))


async def whole_in_pieces(
    request: web.BaseRequest,
    entry: CachedResponse,
    status: CacheStatus,
    cache_status: str,
    write_timeout: float,
    body: bytes | None = None,
) -> web.StreamResponse:
    """whole() for a large answer: written PIECE by PIECE, each under `write_timeout`, so a
    client that reads nothing holds a socket buffer's worth, not a copy of the answer."""
    data = memoryview(entry.body if body is None else body)
    resp = web.StreamResponse(status=entry.status)
    _headers(resp, entry, status, cache_status)
    resp.content_length = len(data)
    await resp.prepare(request)
    try:
        for start in range(0, len(data), PIECE):
            async with asyncio.timeout(write_timeout):
                await resp.write(data[start : start + PIECE])
    except (ConnectionResetError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()  # takes nothing: drop it and what its socket buffers
        return resp
    await resp.write_eof()
    return resp


def is_fast(entry: CachedResponse, rule: Rule | None) -> bool:
    return not entry.stream or rule is None or rule.replay == "fast" or not entry.chunk_ms


async def replay(
    request: web.BaseRequest,
    entry: CachedResponse,
    rule: Rule | None,
    status: CacheStatus,
    cache_status: str,
) -> web.StreamResponse:
    """Send a stored answer: whole at once, or at its recorded pace if the rule says so."""
    if is_fast(entry, rule):
        return whole(entry, status, cache_status)
    assert rule is not None
    resp = web.StreamResponse(status=entry.status)
    headers = resp.headers
    headers.extend(entry.headers)
    headers["X-Cache-Status"] = status.header
    headers["Cache-Status"] = cache_status
    if status in (HIT, STALE):
        headers["Age"] = age_of(entry)
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for chunk, at_ms in zip(entry.chunks(), entry.chunk_ms, strict=False):
        delay = start + at_ms / 1000.0 / rule.replay_speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await resp.write(chunk)
    await resp.write_eof()
    return resp

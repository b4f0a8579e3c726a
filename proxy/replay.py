"""CachedResponse -> the client's response, with the original framing and bytes: a whole
answer and the headers of every stored answer (relay.py writes the larger ones)."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from proxy.models import CLOCK, CachedResponse
from proxy.rules import Rule
from proxy.status import HIT, HIT_CACHE_STATUS, STALE, CacheStatus, mark


def whole(
    entry: CachedResponse,
    status: CacheStatus,
    cache_status: str,
    body: bytes | None = None,
    now: float | None = None,
) -> web.Response:
    """A stored answer as one response (the fast replay, and every non-stream answer);
    `body` replaces the stored one (an answer rebased for its client); `now`, if the caller
    read the clock already."""
    if body is None and status is HIT and cache_status == HIT_CACHE_STATUS:  # the plain HIT
        headers = (*entry.hit_headers, ("Age", age_of(entry, now)))
        return web.Response(status=entry.status, body=entry.body, headers=headers)
    return web.Response(
        status=entry.status,
        body=entry.body if body is None else body,
        headers=headers_of(entry, status, cache_status, now),
    )


def headers_of(
    entry: CachedResponse, status: CacheStatus, cache_status: str, now: float | None = None
) -> CIMultiDict[str]:
    """A stored answer's headers as this answer carries them: the status pair, and Age."""
    if status is HIT and cache_status == HIT_CACHE_STATUS:  # prebuilt for the plain HIT
        headers = CIMultiDict(entry.hit_headers)
    else:
        headers = CIMultiDict(entry.headers)
        mark(headers, status, cache_status)
        if status is not HIT and status is not STALE:
            return headers
    headers["Age"] = age_of(entry, now)
    return headers


def age_of(entry: CachedResponse, now: float | None = None) -> str:
    """The Age header of a stored answer: whole seconds since it was stored (until `now`)."""
    return str(max(0, int((CLOCK.now() if now is None else now) - entry.created)))


def is_fast(entry: CachedResponse, rule: Rule | None) -> bool:
    """Is a stored answer sent at once (not at its recorded pace)?"""
    return not entry.stream or rule is None or rule.replay == "fast" or not entry.chunk_ms

"""CachedResponse -> the client's response, with the original framing and bytes."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.models import HIT_CACHE_STATUS, CachedResponse
from proxy.rules import Rule

CACHE_NAME = "openai-cache-proxy"
assert f"{CACHE_NAME}; hit" == HIT_CACHE_STATUS


def whole(
    entry: CachedResponse, status: str, cache_status: str, body: bytes | None = None
) -> web.Response:
    """A stored answer as one response (the fast replay, and every non-stream answer);
    `body` replaces the stored one (an answer rebased for its client)."""
    resp = web.Response(status=entry.status, body=entry.body if body is None else body)
    headers = resp.headers
    if status == "HIT":
        headers.extend(entry.hit_headers)
        headers.add("Age", str(max(0, int(time.time() - entry.created))))
        return resp
    headers.extend(entry.headers)
    headers.add("X-Cache-Status", status)
    headers.add("Cache-Status", cache_status)
    return resp


def is_fast(entry: CachedResponse, rule: Rule | None) -> bool:
    return not entry.stream or rule is None or rule.replay == "fast" or not entry.chunk_ms


async def replay(
    request: web.BaseRequest,
    entry: CachedResponse,
    rule: Rule | None,
    status: str,
    cache_status: str,
) -> web.StreamResponse:
    """Send a stored answer: whole at once, or at its recorded pace if the rule says so."""
    if is_fast(entry, rule):
        return whole(entry, status, cache_status)
    assert rule is not None
    resp = web.StreamResponse(status=entry.status)
    headers = resp.headers
    headers.extend(entry.headers)
    headers["X-Cache-Status"] = status
    headers["Cache-Status"] = cache_status
    if status == "HIT":
        headers["Age"] = str(max(0, int(time.time() - entry.created)))
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

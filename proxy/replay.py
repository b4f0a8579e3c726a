"""CachedResponse -> the client's response, with the original framing and bytes."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from multidict import CIMultiDict

from proxy.models import CachedResponse
from proxy.rules import Rule

CACHE_NAME = "openai-cache-proxy"


def entry_headers(entry: CachedResponse, status: str, cache_status: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(entry.headers)
    headers["X-Cache-Status"] = status
    headers["Cache-Status"] = cache_status
    return headers


async def replay(
    request: web.Request, entry: CachedResponse, rule: Rule | None, status: str, cache_status: str
) -> web.StreamResponse:
    """Send a stored answer: whole at once, or at its recorded pace if the rule says so."""
    headers = entry_headers(entry, status, cache_status)
    if status == "HIT":
        headers["Age"] = str(max(0, int(time.time() - entry.created)))
    if not entry.stream or rule is None or rule.replay == "fast" or not entry.chunk_ms:
        return web.Response(status=entry.status, headers=headers, body=entry.body)
    resp = web.StreamResponse(status=entry.status, headers=headers)
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

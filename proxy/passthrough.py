"""Uncached requests: forwarded as they came, the answer streamed back as it comes (through
relay.pump), its tokens and dollars counted on the side. Nothing is read from or written to
the cache."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict

from proxy import sse
from proxy.answers import answer_cost, usage_of_json
from proxy.cost import money_fields
from proxy.errors import UpstreamError, cut_reason, failure_answer
from proxy.plan import Plan
from proxy.record import Record
from proxy.relay import cut, pump
from proxy.state import Forward, State
from proxy.status import BYPASS, mark
from proxy.upstream import Response, response_headers

COUNT_BYTES = 4 * 1024 * 1024
"""Up to this much of a pass-through answer is kept to count what it cost."""


async def passthrough(
    st: State, fwd: Forward, rec: Record, plan: Plan | None = None
) -> web.StreamResponse:
    """Forward as is and stream the answer back; nothing is read from or written to the cache.

    For a request that names a model, up to COUNT_BYTES of the answer are kept on the side to
    count the tokens and dollars it cost."""
    request = fwd.request
    rec.cache = BYPASS
    resp: web.StreamResponse | None = None
    kept: list[bytes] | None = [] if plan is not None and plan.model else None
    t_up = time.perf_counter()
    try:
        async with st.upstream.request(request.method, fwd.path_qs, fwd.fwd, fwd.body) as up:
            headers: CIMultiDict[str] = CIMultiDict(response_headers(up.headers))
            mark(headers, BYPASS)
            resp = web.StreamResponse(status=up.status, headers=headers)
            if "Content-Encoding" not in up.headers and up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            rec.ttfb_ms = round((time.perf_counter() - fwd.t0) * 1000.0, 2)
            chunks = up.content.iter_any() if kept is None else _keeping(up.content, kept)
            whole = await pump(request, resp, chunks, rec, st.settings.write_timeout_s)
            status = up.status
            streamed = "text/event-stream" in up.headers.get("Content-Type", "")
        rec.upstream_ms = round((time.perf_counter() - t_up) * 1000.0, 2)
        if (
            kept is not None
            and plan is not None
            and 200 <= status < 300
            and sum(map(len, kept)) <= COUNT_BYTES
        ):
            data = b"".join(kept)
            usage = sse.usage_of_stream(data) if streamed else usage_of_json(data)
            cost = answer_cost(st.fetcher.prices, rec.route, plan.model, usage, plan.hints, data)
            if cost is not None:
                rec.extra.update(money_fields(cost.fields(), saved=False))
        if whole:
            await resp.write_eof()
        return resp
    except UpstreamError as exc:
        if resp is None:
            failure = failure_answer(exc)
            rec.error = failure.code
            return web.Response(
                status=failure.status, body=failure.body, content_type="application/json"
            )
        rec.cut, rec.cut_detail = cut_reason(exc), str(exc)
    cut(request)
    return resp


async def _keeping(content: Response, kept: list[bytes]) -> AsyncIterator[bytes]:
    """The answer's chunks, the first COUNT_BYTES (and one more chunk) kept on the side."""
    held = 0
    async for chunk in content.iter_any():
        if held <= COUNT_BYTES:
            kept.append(chunk)
            held += len(chunk)
        yield chunk

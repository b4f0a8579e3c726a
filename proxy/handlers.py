"""The data path, its stages in order (each in its own file, each with a small typed result):

intake (intake.py)   request -> Refused | Opaque | Intake (body, tenant, Plan)
hot HIT (hit.py)     a fresh entry in the hot tier, sent whole
onward (intake.py)   the Forward; decide (plan.py) -> PassThrough (passthrough.py) | Keyed
keyed (miss.py)      lookup -> Fresh (hit.py) | Stale | Missing;
                     flight (coalesce.Flights.take) -> Join | Lead, read by fetch.py,
                     relayed to the client (relay.py)
embeddings items     embeddings.py: each input item keyed and fetched on its own
the line             one `request.done` line (record.py, log.py) and the stats
"""

from __future__ import annotations

import time
from typing import assert_never

from aiohttp import web

from proxy.controls import DEFAULT_CONTROLS
from proxy.embeddings import serve_items
from proxy.errors import json_error
from proxy.hit import hot
from proxy.intake import Intake, Opaque, Refused, onward, read_intake, route_of
from proxy.miss import serve_keyed
from proxy.passthrough import passthrough
from proxy.plan import Keyed, PassThrough
from proxy.record import Record
from proxy.state import Forward, State

__all__ = ["Forward", "State", "json_error", "proxy_handler"]


async def proxy_handler(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """Answer from the cache or from upstream; log one line."""
    t0 = time.perf_counter()
    raw_path, _, query = request.raw_path.partition("?")
    route, upstream_path = route_of(raw_path)
    rec = Record(route, request.method)
    resp: web.StreamResponse | None = None
    try:
        intake = await read_intake(st.planner, request, route, upstream_path, query, rec, t0)
        match intake:
            case Intake():
                pass
            case Refused():
                resp = intake.answer
                return resp
            case Opaque():
                resp = await passthrough(st, intake.forward, rec)
                return resp
            case _:
                assert_never(intake)
        plan = intake.plan
        if intake.controls is DEFAULT_CONTROLS and plan.rule is not None and not intake.idem:
            resp = hot(st, request, rec, plan, intake.tenant)  # the HIT fast path
            if resp is not None:
                return resp
        fwd, what = onward(st.planner, intake, rec)
        match what:
            case Keyed() if plan.per_item and not intake.idem:
                resp = await serve_items(st, fwd, rec, plan, intake.tenant, what)
            case Keyed():
                resp = await serve_keyed(st, fwd, rec, plan, intake.tenant, what)
            case PassThrough():
                resp = await passthrough(st, fwd, rec, plan)
            case _:
                assert_never(what)
        return resp
    finally:
        _finish(st, rec, resp, t0)


def _finish(st: State, rec: Record, resp: web.StreamResponse | None, t0: float) -> None:
    """Complete the request's line (status, bytes, times) and write it, with the counters
    behind /_proxy/stats; a shadow semantic lookup still running adds its fields first."""
    duration = (time.perf_counter() - t0) * 1000.0
    status = resp.status if resp is not None else 499
    nbytes = rec.bytes
    if nbytes is None:
        body = resp.body if type(resp) is web.Response else None
        if isinstance(body, bytes):
            nbytes = len(body)
        else:
            nbytes = resp.body_length if resp is not None else 0
    rec.status = status
    rec.bytes = nbytes
    rec.duration_ms = duration = round(duration, 2)
    if rec.ttfb_ms is None:
        rec.ttfb_ms = duration
    after = rec.after
    if after is None or after.done():
        _done(st, rec, duration)
    else:  # a shadow semantic lookup still runs: its fields belong on this line
        after.add_done_callback(lambda _: _done(st, rec, duration))


def _done(st: State, rec: Record, duration: float) -> None:
    """The request's line, rendered once, and the counters behind /_proxy/stats."""
    line = rec.fields()
    st.stats.record(line, duration / 1000.0)
    st.log.done(line)

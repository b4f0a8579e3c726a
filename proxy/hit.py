"""A stored entry -> this client's answer, in one place: a HIT (the hot fast path and the
looked-up one), a semantic HIT, a STALE answer in place of an upstream failure, and a twin
converted to the form this request asks for (twins.py)."""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web

from proxy.coalesce import Flight
from proxy.errors import NotConvertible
from proxy.images.base import rebase
from proxy.models import CLOCK, CachedResponse
from proxy.plan import Plan
from proxy.record import Record, bounded
from proxy.relay import WHOLE_MAX, in_pieces, paced, request_base
from proxy.replay import age_of, is_fast, whole
from proxy.state import State, off_loop
from proxy.status import (
    HIT,
    HIT_CACHE_STATUS,
    PROXY_FAILURES,
    STALE,
    CacheStatus,
    Failure,
    mark,
    stale,
)
from proxy.twins import convert

UPSTREAM_FAILED = Failure.UPSTREAM_FAILED  # a module name: see coalesce.PENDING
STALE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Upstream answers that make a stale answer the better one (RFC 5861 stale-if-error): rate
limits, server errors, and the proxy's own 502/504 for an unreachable or silent upstream.
Never 400/401/403/404: those are about the request or the key."""
CONVERTED_MAX = 256
"""Converted twins kept (per process) so a repeat costs what a plain HIT costs."""
CONVERTED_KEEP_BYTES = 256 * 1024
"""Only converted answers up to this size are kept: the memo stays under 64 MB."""


def hot(
    st: State, request: web.BaseRequest, rec: Record, plan: Plan, tenant: bytes
) -> web.Response | None:
    """The cache-hit fast path: a fresh entry in the hot tier, in the form asked for, sent
    whole (as_stored); None for anything else (looked up the long way, lookup())."""
    entry = st.cache.peek(plan.key)
    if entry is None:
        return None
    now = CLOCK.now()
    if (
        entry.fresh_until < now
        or (plan.form and plan.form != entry.form)
        or (entry.stream and plan.rule is not None and plan.rule.replay != "fast")
        or len(entry.body) > WHOLE_MAX
        or (st.auth is not None and not st.auth.fresh(tenant))
    ):
        return None
    rec.key = plan.kid
    rec.bytes = len(entry.body)
    return as_stored(request, rec, entry, HIT, HIT_CACHE_STATUS, now)


def as_stored(
    request: web.BaseRequest,
    rec: Record,
    entry: CachedResponse,
    label: CacheStatus,
    cache_status: str,
    now: float | None = None,
) -> web.Response:
    """A stored answer in its stored form, sent whole: image links rebased for this client.
    Every whole HIT goes through here, the fast path's included (with the `now` it read)."""
    rec.cache = label
    rec.extra.update(entry.saved_fields)
    if entry.rebase:
        return whole(entry, label, cache_status, rebase(entry.body, request_base(request)), now)
    return whole(entry, label, cache_status, now=now)


async def serve_entry(
    st: State,
    request: web.BaseRequest,
    rec: Record,
    key: str,
    entry: CachedResponse,
    plan: Plan,
    cache_status: str,
    label: CacheStatus = HIT,
    *,
    idempotent: bool = False,
) -> web.StreamResponse | None:
    """How a stored answer becomes this client's answer, for every path that serves one (a
    HIT, a semantic HIT, a STALE answer; the fast path is its sync subset, hot()): the form
    this request wants (a twin converted), image links rebased for this client, whole, in
    pieces or paced. None when it cannot be given in that form (it is fetched again)."""
    rule = plan.rule
    if plan.form and plan.form != entry.form:
        if entry.form == "sse" and plan.twin == "chat" and not idempotent:
            # A chat stream stored without its usage chunk cannot give the usage a JSON
            # answer or an include_usage stream must carry: fetched again (and replaced).
            # Not under an Idempotency-Key, which names one upstream call: its retry in
            # the other form gets that answer converted, with no usage (`usage: null`).
            rec.extra["twin_skipped"] = "no_usage"
            return None
        converted = await twin(st, rec, key, entry, plan, cache_status, label)
        if converted is not None:
            rec.cache = label
            rec.extra.update(entry.saved_fields)
        return converted
    fast = is_fast(entry, rule)
    if entry.rebase or (fast and len(entry.body) <= WHOLE_MAX):
        return as_stored(request, rec, entry, label, cache_status)
    rec.cache = label
    rec.extra.update(entry.saved_fields)
    wt = st.settings.write_timeout_s
    if fast:
        return await in_pieces(request, rec, entry, label, cache_status, wt)
    assert rule is not None
    return await paced(request, rec, entry, rule, label, cache_status, wt)


async def auth_refusal(
    st: State, tenant: bytes, request: web.BaseRequest, rec: Record
) -> web.Response | None:
    """The upstream's refusal of a credential not checked lately (auth.py), else None."""
    if st.auth is None or st.auth.fresh(tenant):
        return None
    refusal = await st.auth.check(tenant, request.headers)
    if refusal is None:
        return None
    rec.auth_refused = True
    refused = web.Response(status=refusal.status, body=refusal.body)
    refused.headers.extend(refusal.headers)
    return refused


def failed(flight: Flight) -> bool:
    """Did the upstream fail for this flight in a way a stale answer may cover?"""
    head = flight.head
    return head is None or head.status in STALE_STATUSES


class Stale(NamedTuple):
    """An expired entry that may cover an upstream failure, and what it was looked up for."""

    key: str
    entry: CachedResponse
    plan: Plan


async def serve_stale(
    st: State, request: web.BaseRequest, rec: Record, flight: Flight, found: Stale
) -> web.StreamResponse | None:
    """The stale answer in place of the upstream's failure, saying which failure it covers,
    made this client's answer as a HIT is (serve_entry); None when it cannot be given in the
    form asked for (the failure is relayed then)."""
    head = flight.head
    error, status = rec.error, rec.upstream_status
    reason = flight.reason
    if head is None or reason in PROXY_FAILURES:
        code = reason if reason is not None and reason in PROXY_FAILURES else UPSTREAM_FAILED
        rec.error = code
        cause = f"detail={code.replace('_', '-')}"
    else:
        rec.upstream_status = head.status
        cause = f"fwd-status={head.status}"
    key, entry, plan = found
    served = await serve_entry(st, request, rec, key, entry, plan, stale(cause), STALE)
    if served is None:
        rec.error, rec.upstream_status = error, status
    return served


async def twin(
    st: State,
    rec: Record,
    key: str,
    entry: CachedResponse,
    plan: Plan,
    cache_status: str = HIT_CACHE_STATUS,
    label: CacheStatus = HIT,
) -> web.Response | None:
    """The stored answer in the form this request wants, when that is the other form (a
    streamed request for a stored JSON answer, or the reverse); None when the forms match or
    the stored answer cannot be converted: a damaged entry is deleted, and fetched again."""
    assert plan.twin is not None
    memo_key = (key, entry.created, plan.form)
    body = st.converted.get(memo_key)
    if body is None:
        try:  # a large answer is converted off the loop, like a large request body
            body = await off_loop(st.workers, len(entry.body), _convert_twin, plan, entry)
        except NotConvertible as exc:
            rec.extra["twin_error"] = bounded(str(exc), 120)
            await st.cache.delete(key, entry)
            return None
        if len(body) <= CONVERTED_KEEP_BYTES:
            if len(st.converted) >= CONVERTED_MAX:
                st.converted.pop(next(iter(st.converted)))
            st.converted[memo_key] = body
    rec.converted = f"{entry.form}->{plan.form}"
    rec.bytes = len(body)
    resp = web.Response(status=entry.status, body=body)
    headers = resp.headers
    for name, value in entry.headers:
        if name.lower() != "content-type":
            headers.add(name, value)
    sse = plan.form != "json"
    headers["Content-Type"] = "text/event-stream; charset=utf-8" if sse else "application/json"
    mark(headers, label, cache_status)
    headers["Age"] = age_of(entry)
    return resp


def _convert_twin(plan: Plan, entry: CachedResponse) -> bytes:
    """The stored answer in the plan's form (a stream to a stream goes through its object)."""
    assert plan.twin is not None
    source = entry.body
    if entry.stream and plan.form != "json":  # stream -> stream with(out) its usage chunk
        source = convert(plan.twin, source, to_stream=False, include_usage=False)
    return convert(
        plan.twin, source, to_stream=plan.form != "json", include_usage=plan.form == "sse+usage"
    )

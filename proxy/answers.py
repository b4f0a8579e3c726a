"""The response side's decisions, apart from the I/O: may a finished answer be stored, and
its stored form with its usage and cost. Pure (functions of a finished flight's data).
"""

from __future__ import annotations

import sys
from array import array
from typing import Any, NamedTuple, Protocol

import orjson

from proxy import sse
from proxy.coalesce import COMPLETE, Flight
from proxy.cost import Cost, Prices
from proxy.models import CLOCK, CachedResponse


class EntrySpec(Protocol):
    """What a stored entry is made with beside its flight (fetch.FetchJob is one): this
    module depends on nothing above it."""

    @property
    def route(self) -> str: ...
    @property
    def ttl_s(self) -> float: ...
    @property
    def meta(self) -> dict[str, Any]: ...


UNKNOWN: Any = object()
"""A verdict's usage when it was not read while checking: make_entry reads it from the body."""
OWN_HEADERS = frozenset({"x-cache-status", "cache-status", "age"})


class Verdict(NamedTuple):
    ok: bool
    why: str = ""
    """Why a whole 2xx answer is not stored (logged); "" when there is nothing to say."""
    usage: Any = UNKNOWN
    """The usage found while checking (None: none), or UNKNOWN."""


NOT_STORED = Verdict(False)


def storable(flight: Flight, stream: bool, body: bytes) -> Verdict:
    """May this finished flight's answer be stored? Only a whole 200 answer under the record
    limit (a 204 or another 2xx is no answer to keep: an empty body served as a HIT), with
    its framing intact: a stream that ended with its terminal event (and no error event), a
    JSON answer that parses and is no error object, and as many bytes as the upstream's
    Content-Length said. `body` is the flight's body (b"" unless 2xx)."""
    head = flight.head
    if flight.outcome is not COMPLETE or head is None or not 200 <= head.status < 300:
        return NOT_STORED
    if head.status != 200:
        return Verdict(False, f"status {head.status}, not 200")
    if flight.overflow:
        return Verdict(False, "above max_record_mb")
    usage: Any = UNKNOWN
    if stream and flight.scan is not None:
        flight.scan.close()
        why, usage = flight.scan.verdict(), flight.scan.usage
    elif stream:
        why = sse.verdict(body)
    else:
        why, usage = json_verdict(head.headers, body)
    if not why and flight.expected_size is not None and flight.size != flight.expected_size:
        why = "length differs from Content-Length"
    return Verdict(not why, why, usage)


def json_verdict(headers: tuple[tuple[str, str], ...], body: bytes) -> tuple[str, Any]:
    """(why not to store, usage) for a whole non-streamed 2xx answer. A JSON answer must parse
    and must not be an error object; other types (audio, text) are taken as they are."""
    ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
    if "json" not in ctype.lower():
        return "", UNKNOWN
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "a JSON answer that does not parse", None
    if not isinstance(doc, dict):
        return "", None
    if doc.get("error"):
        return "an error object under a 2xx status", None
    usage = doc.get("usage")
    return "", usage if isinstance(usage, dict) else None


def stored_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Rate-limit headers describe the request that was made, not the one a HIT answers; the
    cache's own status headers are added on the way out.

    Names and values are shared between entries (most repeat from answer to answer: a
    stored answer's headers took more memory than a short answer's body)."""
    out = []
    for k, v in headers:
        low = k.lower()
        if low.startswith("x-ratelimit-") or low in OWN_HEADERS:
            continue
        name = _NAMES.get(k)
        if name is None:
            if len(_NAMES) >= NAMES_MAX:
                _NAMES.clear()
            name = str(k)  # aiohttp's names are multidict.istr, which cannot be interned
            _NAMES[name] = name
        out.append((name, sys.intern(str(v))))
    return tuple(out)


_NAMES: dict[str, str] = {}
NAMES_MAX = 1024
"""Header names shared between stored answers (an upstream sends a few dozen)."""


def make_entry(
    flight: Flight,
    job: EntrySpec,
    *,
    stream: bool,
    body: bytes,
    prices: Prices,
    usage: Any = UNKNOWN,
) -> CachedResponse:
    """The stored form of a finished flight, with its usage and cost (`usage` if the caller
    already read it from the body)."""
    head = flight.head
    assert head is not None
    ends = array("q")
    if stream:
        total = 0
        for chunk in flight.chunks:
            total += len(chunk)
            ends.append(total)
    if usage is UNKNOWN:
        usage = sse.usage_of_stream(body) if stream else usage_of_json(body)
    meta = {k: v for k, v in job.meta.items() if k in ("fingerprint", "model", "route")}
    meta["ttl"] = job.ttl_s  # freshness; the store keeps it keep_s longer (stale-if-error)
    if stream and job.route.endswith("/chat/completions") and usage:
        meta["sse_usage"] = True  # the stream carries its usage chunk (see twins)
    if flight.rebase:
        meta["rebase"] = True
    cost = answer_cost(prices, job.route, job.meta.get("model"), usage, job.meta.get("hints"), body)
    if cost is not None:
        meta["cost"] = cost.fields()
    return CachedResponse(
        status=head.status,
        headers=stored_headers(head.headers),
        body=body,
        created=CLOCK.now(),
        stream=stream,
        chunk_ends=ends if stream else (),
        chunk_ms=array("d", [round(ms, 1) for ms in flight.chunk_ms]) if stream else (),
        upstream_ms=round(flight.upstream_ms, 1),
        meta=meta,
    )


def answer_cost(
    prices: Prices,
    route: str,
    model: str | None,
    usage: dict[str, Any] | None,
    hints: dict[str, Any] | None,
    body: bytes,
) -> Cost | None:
    """Tokens and dollars of one good answer (images counted from the answer's items)."""
    images = 0
    if "/images/" in route and not usage:
        images = body.count(b'"url"') + body.count(b'"b64_json"')
    return prices.cost(route, model, usage, hints or {}, images=images)


def usage_of_json(body: bytes) -> dict[str, Any] | None:
    if b'"usage"' not in body:
        return None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None

"""The cache-status vocabulary, in one place: the X-Cache-Status header, RFC 9211's
Cache-Status, the `cache` field of request.done, and the labels of stats and metrics. Pure."""

from __future__ import annotations

from collections.abc import MutableMapping
from enum import StrEnum

CACHE_NAME = "openai-cache-proxy"
"""The cache's name in RFC 9211 Cache-Status."""


class CacheStatus(StrEnum):
    """What happened to one request; the value is the log and stats label."""

    HIT = "hit"
    """Answered from the cache; the upstream was not called."""
    MISS = "miss"
    REFRESH = "refresh"
    """Cache-Control: no-cache: fetched anew, and the stored answer replaced."""
    BYPASS = "bypass"
    """Not cached: no rule, no-store, or the store is down."""
    COALESCED = "coalesced"
    """Shared an identical request's upstream call."""
    STALE = "stale"
    """A stored answer past its TTL, in place of an upstream failure (stale-if-error)."""
    PARTIAL = "partial"
    """Embeddings: some input items came from the cache, the others from upstream."""

    # Plain attributes, set on each member below (an Enum property, or .name and .value,
    # cost about 0.4 us a read; these are read a few times on every request).
    header: str
    """The X-Cache-Status value."""
    rfc9211: str
    """The Cache-Status value (a STALE answer adds what it covers: stale())."""
    served: bool
    """Answered without an upstream call of its own (what the hit ratio counts)."""
    label: str
    """The `cache` field of request.done and the stats label (the member's value)."""


_RFC9211 = {
    CacheStatus.HIT: f"{CACHE_NAME}; hit",
    CacheStatus.MISS: f"{CACHE_NAME}; fwd=uri-miss",
    CacheStatus.REFRESH: f"{CACHE_NAME}; fwd=request",
    CacheStatus.BYPASS: f"{CACHE_NAME}; fwd=bypass",
    CacheStatus.COALESCED: f"{CACHE_NAME}; fwd=miss; collapsed",
    CacheStatus.STALE: f"{CACHE_NAME}; fwd=stale",
    CacheStatus.PARTIAL: f"{CACHE_NAME}; fwd=partial",
}
SERVED = frozenset({CacheStatus.HIT, CacheStatus.COALESCED, CacheStatus.STALE})
for _status in CacheStatus:
    _status.header = _status.name
    _status.rfc9211 = _RFC9211[_status]
    _status.served = _status in SERVED
    _status.label = _status.value
STATUSES = tuple(s.value for s in CacheStatus)
HIT, MISS, REFRESH = CacheStatus.HIT, CacheStatus.MISS, CacheStatus.REFRESH
BYPASS, COALESCED, STALE = CacheStatus.BYPASS, CacheStatus.COALESCED, CacheStatus.STALE
PARTIAL = CacheStatus.PARTIAL
"""The members as module names, for the data path (see coalesce.PENDING: an Enum member
read through its class is slow in Python 3.11)."""
HIT_CACHE_STATUS = CacheStatus.HIT.rfc9211
SEMANTIC_HIT = f"{HIT_CACHE_STATUS}; detail=semantic"
"""A HIT found by meaning (vectors.py): RFC 9211's `detail` says so."""


def semantic_hit(similarity: float) -> str:
    """SEMANTIC_HIT with its similarity as an RFC 9211 extension parameter (an RFC 8941
    decimal: three digits, rounded down so 0.9996 never reads as 1.000)."""
    shown = max(0.0, min(1.0, int(similarity * 1000) / 1000))
    return f"{SEMANTIC_HIT}; similarity={shown:.3f}"


def stale(cause: str) -> str:
    """Cache-Status of a STALE answer: which failure it covers (fwd-status=503, detail=...)."""
    return f"{CacheStatus.STALE.rfc9211}; {cause}"


def mark(headers: MutableMapping[str, str], status: CacheStatus, cache_status: str = "") -> None:
    """Write the pair of status headers an answer carries (X-Cache-Status, Cache-Status), set
    over any already there: the one place they are written into headers (status_pair builds
    them as items). `cache_status`: Cache-Status when it says more than the status's own (a
    STALE answer's cause, a semantic HIT)."""
    headers["X-Cache-Status"] = status.header
    headers["Cache-Status"] = cache_status or status.rfc9211


def status_pair(
    status: CacheStatus, cache_status: str = ""
) -> tuple[tuple[str, str], tuple[str, str]]:
    """The same pair as mark() writes, as header items (for headers built as a tuple)."""
    return ("X-Cache-Status", status.header), ("Cache-Status", cache_status or status.rfc9211)


class Failure(StrEnum):
    """Why a flight or an answer failed, one vocabulary for all: the code of the proxy's error
    answer, the `error` field of request.done (when the proxy answered for the upstream), the
    `cut` field (when an answer broke off after its head), and Flight.reason for both."""

    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    PROXY_FAILURE = "proxy_failure"
    """The proxy failed while reading the upstream answer."""
    UPSTREAM_FAILED = "upstream_failed"
    """The upstream answer broke off before its head (the proxy's 502)."""
    UPSTREAM_CUT = "upstream_cut"
    """The upstream answer broke off after its head (cut body, bad framing, decoding)."""
    TOO_LARGE = "too_large"
    """An answer read whole grew past what one may hold (coalesce.WHOLE_READ_MAX)."""
    CLIENTS_LEFT = "clients_left"
    """Every client left and detached_max_s passed: the upstream read was given up."""
    CANCELLED = "cancelled"
    """The upstream read was cancelled (the proxy shutting down)."""
    LEADER_LOST = "leader_lost"
    """The instance leading the flight (bus.py) was lost after its answer began."""
    FOLLOW_FAILED = "follow_failed"
    """Following the leading instance failed after its answer began."""
    NOT_STARTED = "not_started"
    """No upstream read was started for the flight."""


PROXY_FAILURES = frozenset(
    {Failure.UPSTREAM_UNREACHABLE, Failure.UPSTREAM_TIMEOUT, Failure.PROXY_FAILURE}
)
"""A flight's reason when the proxy answered for a failed upstream (logged as `error`)."""

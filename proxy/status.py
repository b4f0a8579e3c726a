"""The cache-status vocabulary, in one place: the X-Cache-Status header, RFC 9211's
Cache-Status, the `cache` field of request.done, and the labels of stats and metrics. Pure."""

from __future__ import annotations

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

    @property
    def header(self) -> str:
        """The X-Cache-Status value."""
        return self.name

    @property
    def rfc9211(self) -> str:
        """The Cache-Status value (a STALE answer adds what it covers: stale())."""
        return _RFC9211[self]

    @property
    def served(self) -> bool:
        """Answered without an upstream call of its own (what the hit ratio counts)."""
        return self in SERVED


_RFC9211 = {
    CacheStatus.HIT: f"{CACHE_NAME}; hit",
    CacheStatus.MISS: f"{CACHE_NAME}; fwd=uri-miss",
    CacheStatus.REFRESH: f"{CACHE_NAME}; fwd=request",
    CacheStatus.BYPASS: f"{CACHE_NAME}; fwd=bypass",
    CacheStatus.COALESCED: f"{CACHE_NAME}; fwd=miss; collapsed",
    CacheStatus.STALE: f"{CACHE_NAME}; fwd=stale",
}
STATUSES = tuple(s.value for s in CacheStatus)
SERVED = frozenset({CacheStatus.HIT, CacheStatus.COALESCED, CacheStatus.STALE})
HIT_CACHE_STATUS = CacheStatus.HIT.rfc9211
SEMANTIC_HIT = f"{HIT_CACHE_STATUS}; detail=semantic"
"""A HIT found by meaning (vectors.py): RFC 9211's `detail` says so."""


def stale(cause: str) -> str:
    """Cache-Status of a STALE answer: which failure it covers (fwd-status=503, detail=...)."""
    return f"{CacheStatus.STALE.rfc9211}; {cause}"

"""Record: one request's `request.done` line, filled along the data path, rendered once.

A slotted record instead of a dict travelling through the handler: its fields are named and
typed, a stream in flight holds a few hundred bytes instead of a dict's kilobyte, and
`fields()` is the one place that decides what the line says (unset fields are left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.status import CacheStatus

_UNSET: Any = object()
LABEL_MAX = 96
"""Longest client-given string (model, namespace) copied into logs, stats and memos."""
ROUTE_MAX = 256
"""Longest route copied into a log line or an entry (the key covers the whole path)."""
METHOD_MAX = 16


def bounded(value: str, limit: int = LABEL_MAX) -> str:
    """`value` cut to `limit` characters (marked with "~"), for logs, labels and memos."""
    return value if len(value) <= limit else value[: limit - 1] + "~"


@dataclass(slots=True)
class Record:
    route: str
    method: str
    cache: CacheStatus = CacheStatus.BYPASS
    """Its value is the line's `cache` field (status.py)."""
    tenant: str | None = _UNSET
    """12-character tenant id; None for a request that was never keyed (undecodable body)."""
    namespace: str | None = None
    rule: str | None = None
    model: str | None = None
    stream: bool | None = None
    key: str | None = None
    status: int = 0
    bytes: int | None = None
    chunks: int | None = None
    duration_ms: float = 0.0
    ttfb_ms: float | None = None
    upstream_ms: float | None = None
    upstream_status: int | None = None
    error: str | None = None
    """A failure the proxy answered for (upstream_unreachable, upstream_timeout...)."""
    cut: str | None = None
    """Why an answer broke off after its head (a status.Failure code); cut_detail in words."""
    cut_detail: str | None = None
    converted: str | None = None
    client_gone: bool = False
    client_dropped: bool = False
    lock_timeout: bool = False
    auth_refused: bool = False
    after: Any = None
    """A task the line waits for (a shadow semantic lookup still running); not rendered."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Money (tokens, cost_usd / saved_usd, saved_ms) and semantic lookup fields, as the
    functions that compute them name them (cost.money_fields, vectors.Probe.fields)."""

    def __post_init__(self) -> None:
        # client-given: bounded before anything can log them (most are short already)
        if len(self.route) > ROUTE_MAX:
            self.route = bounded(self.route, ROUTE_MAX)
        if len(self.method) > METHOD_MAX:
            self.method = bounded(self.method, METHOD_MAX)

    def fields(self) -> dict[str, Any]:
        """The line's fields: every field that was set, then the extra ones. (Spelled out
        field by field: it runs once per request, on the cache-hit path.)"""
        out: dict[str, Any] = {
            "cache": self.cache.label,
            "route": self.route,
            "method": self.method,
        }
        if self.tenant is not _UNSET:
            out["tenant"] = self.tenant
        if self.namespace is not None:
            out["namespace"] = bounded(self.namespace)
        if self.rule is not None:
            out["rule"] = self.rule
        if self.model is not None:
            out["model"] = self.model
        if self.stream is not None:
            out["stream"] = self.stream
        if self.key is not None:
            out["key"] = self.key
        out["status"] = self.status
        out["bytes"] = self.bytes
        if self.chunks is not None:
            out["chunks"] = self.chunks
        out["duration_ms"] = self.duration_ms
        out["ttfb_ms"] = self.ttfb_ms
        if self.upstream_ms is not None:
            out["upstream_ms"] = self.upstream_ms
        if self.upstream_status is not None:
            out["upstream_status"] = self.upstream_status
        if self.error is not None:
            out["error"] = self.error
        if self.cut is not None:
            out["cut"] = self.cut
            if self.cut_detail:
                out["cut_detail"] = bounded(self.cut_detail, 200)
        if self.converted is not None:
            out["converted"] = self.converted
        if self.client_gone:
            out["client_gone"] = True
        if self.client_dropped:
            out["client_dropped"] = True
        if self.lock_timeout:
            out["lock_timeout"] = True
        if self.auth_refused:
            out["auth_refused"] = True
        if self.extra:
            out.update(self.extra)
        return out

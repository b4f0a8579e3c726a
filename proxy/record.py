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
    converted: str | None = None
    client_gone: bool = False
    client_dropped: bool = False
    lock_timeout: bool = False
    auth_refused: bool = False
    after: Any = None
    """A task the line waits for (a shadow semantic lookup still running); not rendered."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Money (tokens, cost_usd / saved_usd, saved_ms) and semantic lookup fields, as the
    functions that compute them name them (models.money_fields, vectors.Probe.fields)."""

    def fields(self) -> dict[str, Any]:
        """The line's fields: every field that was set, then the extra ones."""
        out: dict[str, Any] = {
            "cache": self.cache.value,
            "route": self.route,
            "method": self.method,
        }
        if self.tenant is not _UNSET:
            out["tenant"] = self.tenant
        for name in ("namespace", "rule", "model", "stream", "key"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["status"] = self.status
        out["bytes"] = self.bytes
        if self.chunks is not None:
            out["chunks"] = self.chunks
        out["duration_ms"] = self.duration_ms
        out["ttfb_ms"] = self.ttfb_ms
        for name in ("upstream_ms", "upstream_status", "error", "cut", "converted"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("client_gone", "client_dropped", "lock_timeout", "auth_refused"):
            if getattr(self, name):
                out[name] = True
        out.update(self.extra)
        return out

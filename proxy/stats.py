"""In-process counters behind /_proxy/stats."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

STATUSES = ("hit", "miss", "refresh", "bypass", "coalesced")
_PLURAL = {
    "hit": "hits",
    "miss": "misses",
    "refresh": "refreshes",
    "bypass": "bypasses",
    "coalesced": "coalesced",
}


class Stats:
    """Requests by cache status, overall and per route, plus bytes served."""

    def __init__(self) -> None:
        self.started = time.time()
        self.total: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.errors = 0
        self.bytes = 0
        self.per_route: defaultdict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(STATUSES, 0)
        )

    def record(self, route: str, cache: str, status: int, nbytes: int) -> None:
        self.total[cache] += 1
        self.bytes += nbytes
        if status >= 400:
            self.errors += 1
        if len(self.per_route) < 256 or route in self.per_route:
            self.per_route[route][cache] += 1

    def snapshot(self) -> dict[str, Any]:
        requests = sum(self.total.values())
        served = self.total["hit"] + self.total["coalesced"]
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": requests,
            **{_PLURAL[k]: v for k, v in self.total.items()},
            "errors": self.errors,
            "bytes": self.bytes,
            "hit_ratio": round(served / requests, 4) if requests else 0.0,
            "per_route": {r: dict(c) for r, c in sorted(self.per_route.items())},
        }

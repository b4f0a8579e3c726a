"""In-process counters behind /_proxy/stats, /_proxy/metrics and the dashboard.

One `record` per request, from the same fields as its `request.done` line. Label values stay
bounded: the route is the matching rule's route (or "other"), the model one of the first 64
seen (then "other"); no key or tenant is ever a label.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

STATUSES = ("hit", "miss", "refresh", "bypass", "coalesced")
_PLURAL = {
    "hit": "hits",
    "miss": "misses",
    "refresh": "refreshes",
    "bypass": "bypasses",
    "coalesced": "coalesced",
}
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
MAX_MODELS = 64
SERIES_MINUTES = 24 * 60


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    tokens_in_spent: int = 0
    tokens_out_spent: int = 0
    tokens_in_saved: int = 0
    tokens_out_saved: int = 0
    usd_spent: float = 0.0
    usd_saved: float = 0.0
    ms_saved: float = 0.0
    unpriced: int = 0

    def add(self, status: int, nbytes: int, money: Money | None) -> None:
        self.requests += 1
        self.bytes += nbytes
        if status >= 400:
            self.errors += 1
        if money is not None:
            money.apply(self)


@dataclass(frozen=True, slots=True)
class Money:
    """What one request spent upstream or saved by not going there."""

    saved: bool
    tokens_in: int
    tokens_out: int
    usd: float | None
    ms: float = 0.0

    def apply(self, t: Totals) -> None:
        if self.saved:
            t.tokens_in_saved += self.tokens_in
            t.tokens_out_saved += self.tokens_out
            t.usd_saved += self.usd or 0.0
            t.ms_saved += self.ms
        else:
            t.tokens_in_spent += self.tokens_in
            t.tokens_out_spent += self.tokens_out
            t.usd_spent += self.usd or 0.0
        if self.usd is None:
            t.unpriced += 1


@dataclass(slots=True)
class Minute:
    minute: int
    requests: int = 0
    served: int = 0
    usd_saved: float = 0.0
    usd_spent: float = 0.0


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.total = Totals()
        self.cells: dict[tuple[str, str, str], Totals] = {}
        self.latency: dict[str, Histogram] = {s: Histogram() for s in STATUSES}
        self.models: set[str] = set()
        self.series: deque[Minute] = deque(maxlen=SERIES_MINUTES)

    def model_label(self, model: str | None) -> str:
        if not model:
            return "none"
        if model in self.models:
            return model
        if len(self.models) < MAX_MODELS:
            self.models.add(model)
            return model
        return "other"

    def record(
        self,
        route: str,
        model: str | None,
        cache: str,
        status: int,
        nbytes: int,
        duration_s: float,
        money: Money | None = None,
    ) -> None:
        self.by_status[cache] += 1
        self.total.add(status, nbytes, money)
        key = (route, self.model_label(model), cache)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = Totals()
        cell.add(status, nbytes, money)
        self.latency[cache].observe(duration_s)
        minute = int(time.time() // 60)
        if not self.series or self.series[-1].minute != minute:
            self.series.append(Minute(minute))
        m = self.series[-1]
        m.requests += 1
        if cache in ("hit", "coalesced"):
            m.served += 1
        if money is not None and money.usd:
            if money.saved:
                m.usd_saved += money.usd
            else:
                m.usd_spent += money.usd

    def _window(self, minutes: int) -> dict[str, Any]:
        since = int(time.time() // 60) - minutes + 1
        rows = [m for m in self.series if m.minute >= since]
        requests = sum(m.requests for m in rows)
        served = sum(m.served for m in rows)
        return {
            "requests": requests,
            "served_from_cache": served,
            "hit_ratio": round(served / requests, 4) if requests else 0.0,
            "saved_usd": round(sum(m.usd_saved for m in rows), 6),
            "spent_usd": round(sum(m.usd_spent for m in rows), 6),
        }

    def _group(self, index: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, cell in self.cells.items():
            row = out.setdefault(
                key[index],
                {
                    "requests": 0,
                    **dict.fromkeys(STATUSES, 0),
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "spent_usd": 0.0,
                    "saved_usd": 0.0,
                },
            )
            row["requests"] += cell.requests
            row[key[2]] += cell.requests
            row["tokens_in"] += cell.tokens_in_spent + cell.tokens_in_saved
            row["tokens_out"] += cell.tokens_out_spent + cell.tokens_out_saved
            row["spent_usd"] += cell.usd_spent
            row["saved_usd"] += cell.usd_saved
        for row in out.values():
            served = row["hit"] + row["coalesced"]
            row["hit_ratio"] = round(served / row["requests"], 4) if row["requests"] else 0.0
            row["spent_usd"] = round(row["spent_usd"], 6)
            row["saved_usd"] = round(row["saved_usd"], 6)
        return dict(sorted(out.items()))

    def snapshot(self) -> dict[str, Any]:
        t = self.total
        served = self.by_status["hit"] + self.by_status["coalesced"]
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": t.requests,
            **{_PLURAL[k]: v for k, v in self.by_status.items()},
            "errors": t.errors,
            "bytes": t.bytes,
            "hit_ratio": round(served / t.requests, 4) if t.requests else 0.0,
            "tokens": {
                "in_spent": t.tokens_in_spent,
                "out_spent": t.tokens_out_spent,
                "in_saved": t.tokens_in_saved,
                "out_saved": t.tokens_out_saved,
            },
            "spent_usd": round(t.usd_spent, 6),
            "saved_usd": round(t.usd_saved, 6),
            "saved_ms": round(t.ms_saved, 1),
            "unpriced": t.unpriced,
            "last_hour": self._window(60),
            "last_day": self._window(SERIES_MINUTES),
            "per_route": self._group(0),
            "per_model": self._group(1),
            "series": [
                {
                    "minute": m.minute * 60,
                    "requests": m.requests,
                    "served": m.served,
                    "saved_usd": round(m.usd_saved, 6),
                }
                for m in list(self.series)[-60:]
            ],
        }

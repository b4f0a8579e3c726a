"""In-process counters behind /_proxy/stats, /_proxy/metrics and the dashboard.

One `record` per request, from the same fields as its `request.done` line. Label values stay
bounded: the route is the matching rule's route (or "other"), the model one of the first 64
seen (then "other"); no key or tenant is ever a label.
"""

from __future__ import annotations

import os
import struct
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.status import SERVED, STATUSES

_PLURAL = {
    "hit": "hits",
    "miss": "misses",
    "refresh": "refreshes",
    "bypass": "bypasses",
    "coalesced": "coalesced",
    "stale": "stale",
    "partial": "partials",
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
MAX_CELLS = 512
"""Most (route, model, cache) counters: with MAX_MODELS and bounded label lengths this keeps
/_proxy/metrics well under 1 MB whatever clients send (then models count as "other")."""
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
    tokens_provider_cached: int = 0
    """Input tokens the provider's own prompt cache served (apart from the proxy's savings)."""
    usd_provider_saved: float = 0.0
    """What those saved at the cached-input price."""
    items_cached: int = 0
    """Embeddings input items answered from the cache (embeddings.py), ..."""
    items_joined: int = 0
    """... from another request's upstream call, ..."""
    items_sent: int = 0
    """... or sent upstream."""

    def add(self, line: dict[str, Any]) -> None:
        """Count one request.done line (see handlers: the fields it carries)."""
        self.requests += 1
        self.bytes += line.get("bytes") or 0
        if (line.get("status") or 0) >= 400:
            self.errors += 1
        if "items" in line:
            self.items_cached += line.get("items_cached") or 0
            self.items_joined += line.get("items_joined") or 0
            self.items_sent += line.get("items_sent") or 0
            if "items_saved_tokens" in line:  # a PARTIAL: spent (below) and saved, both
                self.tokens_in_saved += line["items_saved_tokens"] or 0
                self.usd_saved += line.get("items_saved_usd") or 0.0
        tokens_in = line.get("tokens_in")
        if tokens_in is None:
            return
        if "saved_usd" in line:
            self.tokens_in_saved += tokens_in
            self.tokens_out_saved += line.get("tokens_out") or 0
            self.usd_saved += line["saved_usd"] or 0.0
            self.ms_saved += line.get("saved_ms") or 0.0
        else:
            self.tokens_in_spent += tokens_in
            self.tokens_out_spent += line.get("tokens_out") or 0
            self.usd_spent += line.get("cost_usd") or 0.0
            if "cached_tokens" in line:
                self.tokens_provider_cached += line["cached_tokens"] or 0
                self.usd_provider_saved += line.get("provider_saved_usd") or 0.0
        if "unpriced" in line:
            self.unpriced += 1

    def merge(self, other: Totals) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.cells: dict[tuple[str, str, str], Totals] = {}
        """(rule, model label, cache) -> counters; models past the first 64 share "other"."""
        self._lookup: dict[tuple[str, str | None, str], Totals] = {}
        """(rule, model as sent, cache) -> its cell: one dict lookup per request."""
        self.latency: dict[str, Histogram] = {s: Histogram() for s in STATUSES}
        self.models: set[str] = set()
        self.series: deque[Minute] = deque(maxlen=SERIES_MINUTES)
        self._minute = Minute(int(self.started // 60))
        self._minute_ends = (self._minute.minute + 1) * 60.0
        self.series.append(self._minute)
        self.journal: Journal | None = None
        """With --workers N: every request is also written here (see Shared)."""

    def model_label(self, model: str | None) -> str:
        if not model:
            return "none"
        if model in self.models:
            return model
        if len(self.models) < MAX_MODELS:
            self.models.add(model)
            return model
        return "other"

    def _cell(self, key: tuple[str, str | None, str]) -> Totals:
        """The counters for a key seen for the first time (labels bounded here, once)."""
        bounded = (key[0], self.model_label(key[1]), key[2])
        cell = self.cells.get(bounded)
        if cell is None and len(self.cells) >= MAX_CELLS:
            bounded = (key[0], "other", key[2])
            cell = self.cells.get(bounded)
        if cell is None:
            cell = self.cells[bounded] = Totals()
        if len(self._lookup) < 10_000:
            self._lookup[key] = cell
        return cell

    def record(self, line: dict[str, Any], duration_s: float) -> None:
        """Count one request from its request.done fields (cache, rule, model, status...)."""
        cache = line["cache"]
        key = (line.get("rule", "other"), line.get("model"), cache)
        cell = self._lookup.get(key) or self._cell(key)
        cell.add(line)
        self.latency[cache].observe(duration_s)
        now = time.time()
        if now >= self._minute_ends:
            self._minute = Minute(int(now // 60))
            self._minute_ends = (self._minute.minute + 1) * 60.0
            self.series.append(self._minute)
        m = self._minute
        m.requests += 1
        if cache in SERVED:
            m.served += 1
        usd = line.get("saved_usd") or line.get("items_saved_usd")
        if usd:
            m.usd_saved += usd
        if not line.get("saved_usd"):
            usd = line.get("cost_usd")
            if usd:
                m.usd_spent += usd
        if self.journal is not None:
            self.journal.append(line, duration_s)

    @property
    def total(self) -> Totals:
        total = Totals()
        for cell in self.cells.values():
            total.merge(cell)
        return total

    @property
    def by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for (_rule, _model, cache), cell in self.cells.items():
            counts[cache] += cell.requests
        return counts

    def _window(self, minutes: int) -> dict[str, Any]:
        since = int(time.time() // 60) - minutes + 1
        rows = [m for m in self.series if m.minute >= since and m.requests]
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
                    "provider_cached_tokens": 0,
                    "provider_saved_usd": 0.0,
                },
            )
            row["requests"] += cell.requests
            row[key[2]] += cell.requests
            row["tokens_in"] += cell.tokens_in_spent + cell.tokens_in_saved
            row["tokens_out"] += cell.tokens_out_spent + cell.tokens_out_saved
            row["spent_usd"] += cell.usd_spent
            row["saved_usd"] += cell.usd_saved
            row["provider_cached_tokens"] += cell.tokens_provider_cached
            row["provider_saved_usd"] += cell.usd_provider_saved
        for row in out.values():
            served = sum(row[status] for status in SERVED)
            row["hit_ratio"] = round(served / row["requests"], 4) if row["requests"] else 0.0
            row["spent_usd"] = round(row["spent_usd"], 6)
            row["saved_usd"] = round(row["saved_usd"], 6)
            row["provider_saved_usd"] = round(row["provider_saved_usd"], 6)
        return dict(sorted(out.items()))

    def snapshot(self) -> dict[str, Any]:
        t = self.total
        by_status = self.by_status
        served = sum(by_status[status] for status in SERVED)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": t.requests,
            **{_PLURAL[k]: v for k, v in by_status.items()},
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
            "embedding_items": {
                "cached": t.items_cached,
                "joined": t.items_joined,
                "sent": t.items_sent,
            },
            "provider_cache": {
                "cached_tokens": t.tokens_provider_cached,
                "saved_usd": round(t.usd_provider_saved, 6),
            },
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

    # -- across worker processes ----------------------------------------------------------
    def dump(self, seq: int = 0) -> bytes:
        """This process's counters as JSON, for the other workers to add up (see Shared);
        `seq`: how many of its journal's entries they include."""
        return orjson.dumps(
            {
                "pid": os.getpid(),
                "seq": seq,
                "started": self.started,
                "cells": [
                    [*k, [getattr(t, n) for n in Totals.__slots__]] for k, t in self.cells.items()
                ],
                "latency": {k: [h.counts, h.sum] for k, h in self.latency.items()},
                "series": [
                    [m.minute, m.requests, m.served, m.usd_saved, m.usd_spent] for m in self.series
                ],
            }
        )

    def add_dump(self, data: bytes) -> int:
        """Add another process's dumped counters to these; the journal entries they include."""
        doc = orjson.loads(data)
        self.started = min(self.started, float(doc["started"]))
        names = Totals.__slots__
        for rule, model, cache, values in doc["cells"]:
            cell = self.cells.setdefault((rule, model, cache), Totals())
            cell.merge(Totals(**dict(zip(names, values, strict=True))))
        for status, (counts, total) in doc["latency"].items():
            hist = self.latency.setdefault(status, Histogram())
            hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=False)]
            hist.sum += total
        minutes = {m.minute: m for m in self.series}
        for minute, requests, served, saved, spent in doc["series"]:
            m = minutes.get(minute)
            if m is None:
                m = minutes[minute] = Minute(minute)
            m.requests += requests
            m.served += served
            m.usd_saved += saved
            m.usd_spent += spent
        self.series = deque(
            sorted(minutes.values(), key=lambda m: m.minute)[-SERIES_MINUTES:],
            maxlen=SERIES_MINUTES,
        )
        return int(doc.get("seq", 0))


JOURNAL_SLOT = 256
JOURNAL_SLOTS = 8192
"""Requests a worker's journal holds between two writes of its counters (a ring: 2 MB)."""
_JOURNAL_HEAD = 32
_MAGIC = b"ocpjrnl1"


class Journal:
    """Every request a worker counted, as it counted it, in a memory-mapped ring file.

    The kernel keeps what was written to a shared mapping when the process is killed (even
    by SIGKILL), so a dead worker's last requests, those after its last counters file, are
    still counted: its counters file plus the journal entries after the `seq` it names.
    Header: magic, pid, start time, entries written."""

    def __init__(self, path: Path) -> None:
        import mmap

        self.path = path
        self.count = 0
        size = _JOURNAL_HEAD + JOURNAL_SLOT * JOURNAL_SLOTS
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._map[0:24] = _MAGIC + struct.pack("<Qd", os.getpid(), time.time())

    def append(self, line: dict[str, Any], duration_s: float) -> None:
        entry = orjson.dumps(
            [
                line["cache"],
                line.get("rule", "other"),
                line.get("model"),
                line.get("status"),
                line.get("bytes"),
                line.get("tokens_in"),
                line.get("tokens_out"),
                "saved_usd" in line,
                line.get("saved_usd"),
                line.get("cost_usd"),
                line.get("saved_ms"),
                "unpriced" in line,
                duration_s,
            ]
        )
        if len(entry) > JOURNAL_SLOT - 2:  # a very long model or rule name: counted as other
            entry = orjson.dumps([line["cache"], "other", "other", *orjson.loads(entry)[3:]])
        at = _JOURNAL_HEAD + (self.count % JOURNAL_SLOTS) * JOURNAL_SLOT
        self._map[at : at + 2 + len(entry)] = len(entry).to_bytes(2, "little") + entry
        self.count += 1
        self._map[24:32] = self.count.to_bytes(8, "little")

    def close(self) -> None:
        self._map.close()

    @staticmethod
    def read(path: Path, after: int) -> list[tuple[dict[str, Any], float]]:
        """The entries after the first `after` (those still in the ring), as (line, seconds)."""
        data = path.read_bytes()
        if len(data) < _JOURNAL_HEAD or not data.startswith(_MAGIC):
            return []
        count = int.from_bytes(data[24:32], "little")
        out: list[tuple[dict[str, Any], float]] = []
        for seq in range(max(after, count - JOURNAL_SLOTS + 1), count):
            at = _JOURNAL_HEAD + (seq % JOURNAL_SLOTS) * JOURNAL_SLOT
            size = int.from_bytes(data[at : at + 2], "little")
            try:
                fields = orjson.loads(data[at + 2 : at + 2 + size])
                (cache, rule, model, status, nbytes, t_in, t_out, has_saved, saved, cost) = fields[
                    :10
                ]
                saved_ms, unpriced, duration = fields[10:]
            except (ValueError, TypeError):
                continue  # an entry being written
            line: dict[str, Any] = {"cache": cache, "rule": rule, "model": model}
            line.update(status=status, bytes=nbytes, tokens_in=t_in, tokens_out=t_out)
            line.update(cost_usd=cost, saved_ms=saved_ms)
            if has_saved:
                line["saved_usd"] = saved
            if unpriced:
                line["unpriced"] = True
            out.append((line, float(duration)))
        return out


class Shared:
    """The counters of every worker of one `--workers N` proxy, whichever worker is asked.

    The supervisor gives its workers a folder of their own (named after its pid and start
    time: no other process's files are ever read). Each worker keeps there a journal of
    every request (see Journal) and writes its counters every second (atomic rename), both
    named `<pid>-<start time>`. A worker asked for stats adds to its own live counters every
    other worker's, dead or alive: its latest counters plus its journal since. A dead
    worker's files stay, so what it counted is never lost."""

    def __init__(self, stats: Stats, folder: Path) -> None:
        self.stats = stats
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{time.time_ns()}"
        self.path = folder / f"{name}.json"
        self.journal = Journal(folder / f"{name}.journal")
        stats.journal = self.journal

    def snapshot(self) -> bytes:
        """This worker's counters and how many journal entries they include (on the loop)."""
        return self.stats.dump(seq=self.journal.count)

    def write(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Stop journaling (the last counters are written by the caller first)."""
        self.stats.journal = None
        self.journal.close()

    def combined(self) -> Stats:
        """This worker's counters plus every other worker's, the dead ones' included."""
        total = Stats()
        total.started = self.stats.started
        total.add_dump(self.stats.dump())
        for journal in self.folder.glob("*.journal"):
            if journal == self.journal.path:
                continue
            seq = 0
            try:
                seq = total.add_dump(journal.with_suffix(".json").read_bytes())
            except FileNotFoundError:
                pass  # a worker that never wrote its counters: all in its journal
            except (OSError, ValueError, KeyError, TypeError):
                continue
            try:
                entries = Journal.read(journal, seq)
            except OSError:
                continue
            for line, duration_s in entries:
                total.record(line, duration_s)
        return total

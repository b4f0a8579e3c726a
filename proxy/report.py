"""`python -m proxy report`: what the cache saved, from the proxy's own JSON log lines.

Streams plain or gzipped files (or stdin) line by line in bounded memory: latency
percentiles come from fixed log-scale histograms (2 % wide buckets), not from kept samples.
Lines that are not `request.done` lines of this proxy are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import math
import shutil
import sys
import time
from array import array
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.stats import Totals

GROUPS = ("route", "model", "tenant", "namespace", "day")
_RATIO = math.log(1.02)
_MIN_MS = 0.001
_BUCKETS = int(math.log(1e8 / _MIN_MS) / _RATIO) + 2


class Latency:
    """A log-scale histogram of milliseconds; percentiles are bucket midpoints (±1 %)."""

    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts = array("l", bytes(8 * _BUCKETS))
        self.n = 0

    def add(self, ms: float) -> None:
        i = 0 if ms <= _MIN_MS else min(_BUCKETS - 1, int(math.log(ms / _MIN_MS) / _RATIO) + 1)
        self.counts[i] += 1
        self.n += 1

    def pct(self, q: float) -> float | None:
        if not self.n:
            return None
        rank, seen = q / 100.0 * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return round(_MIN_MS * math.exp((i - 0.5) * _RATIO), 3) if i else _MIN_MS
        return None


@dataclass
class Group:
    """One row: the same money counters as /_proxy/stats, plus HIT/MISS latencies."""

    hits: int = 0
    coalesced: int = 0
    misses: int = 0
    stale: int = 0
    partial: int = 0
    """Embeddings lists answered partly from the cache (embeddings.py)."""
    money: Totals = field(default_factory=Totals)
    spent: Decimal = Decimal(0)
    saved: Decimal = Decimal(0)
    """Dollars as the logged decimals add up exactly (JSON and CSV show them unrounded)."""
    hit_ms: Latency = field(default_factory=Latency)
    miss_ms: Latency = field(default_factory=Latency)
    semantic_hits: int = 0
    """HITs served by meaning (semantic = "on")."""
    shadow_lookups: int = 0
    """MISSes that ran a shadow semantic lookup."""
    shadow_would: int = 0
    """... of which the best candidate cleared the rule's threshold (would have been HITs)."""
    shadow_would_usd: Decimal = Decimal(0)
    """What those MISSes cost: what the semantic layer would have saved."""
    verify_calls: int = 0
    """Calls to the judge model (semantic_verify = "llm")."""
    verify_ms: Latency = field(default_factory=Latency)
    verify_usd: Decimal = Decimal(0)

    def add(self, line: dict[str, Any]) -> None:
        self.money.add(line)
        if "semantic_score" in line or "semantic" in line:
            self._semantic(line)
        for name in ("cost_usd", "saved_usd", "items_saved_usd"):
            value = line.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if name == "cost_usd":
                    self.spent += Decimal(repr(value))
                else:
                    self.saved += Decimal(repr(value))
        cache = line.get("cache")
        ms = line.get("duration_ms")
        failed = (line.get("status") or 0) >= 500 or "error" in line
        if cache == "hit":
            self.hits += 1
            if isinstance(ms, int | float):
                self.hit_ms.add(ms)
        elif cache == "coalesced":
            self.coalesced += 1
        elif cache == "stale":
            self.stale += 1
        elif cache == "partial":
            self.partial += 1
        elif cache == "miss":
            self.misses += 1
            if isinstance(ms, int | float) and not failed:  # a failure is no MISS latency
                self.miss_ms.add(ms)

    def _semantic(self, line: dict[str, Any]) -> None:
        calls = line.get("semantic_verify_calls")
        if isinstance(calls, int) and not isinstance(calls, bool) and calls > 0:
            self.verify_calls += calls
            ms = line.get("semantic_verify_ms")
            if isinstance(ms, int | float) and not isinstance(ms, bool):
                self.verify_ms.add(ms)
            usd = line.get("semantic_verify_cost_usd")
            if isinstance(usd, int | float) and not isinstance(usd, bool):
                self.verify_usd += Decimal(repr(usd))
        if line.get("cache") == "hit" and "semantic_score" in line:
            self.semantic_hits += 1
        elif line.get("semantic") == "shadow" and line.get("cache") == "miss":
            self.shadow_lookups += 1
            if line.get("semantic_hit") is True:
                self.shadow_would += 1
                cost = line.get("cost_usd")
                if isinstance(cost, int | float) and not isinstance(cost, bool):
                    self.shadow_would_usd += Decimal(repr(cost))

    def row(self) -> dict[str, Any]:
        t = self.money
        served = self.hits + self.coalesced + self.stale
        return {
            "requests": t.requests,
            "hit_ratio": round(served / t.requests, 4) if t.requests else 0.0,
            "hits": self.hits,
            "coalesced": self.coalesced,
            "misses": self.misses,
            "stale": self.stale,
            "partial": self.partial,
            "errors": t.errors,
            "tokens_in_spent": t.tokens_in_spent,
            "tokens_out_spent": t.tokens_out_spent,
            "tokens_in_saved": t.tokens_in_saved,
            "tokens_out_saved": t.tokens_out_saved,
            "spent_usd": float(self.spent),
            "saved_usd": float(self.saved),
            "unpriced": t.unpriced,
            "items_cached": t.items_cached,
            "items_joined": t.items_joined,
            "items_sent": t.items_sent,
            "provider_cached_tokens": t.tokens_provider_cached,
            "provider_saved_usd": round(t.usd_provider_saved, 8),
            "hit_p50_ms": self.hit_ms.pct(50),
            "hit_p95_ms": self.hit_ms.pct(95),
            "miss_p50_ms": self.miss_ms.pct(50),
            "miss_p95_ms": self.miss_ms.pct(95),
            "semantic_hits": self.semantic_hits,
            "shadow_lookups": self.shadow_lookups,
            "shadow_would_hit": self.shadow_would,
            "shadow_hit_ratio": round(self.shadow_would / self.shadow_lookups, 4)
            if self.shadow_lookups
            else None,
            "shadow_saved_usd": float(self.shadow_would_usd),
            "verify_calls": self.verify_calls,
            "verify_p50_ms": self.verify_ms.pct(50),
            "verify_usd": float(self.verify_usd),
        }


THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
"""Thresholds the score distribution is shown at (what a rule's semantic_threshold could be)."""


@dataclass
class Scores:
    """The distribution of semantic scores: at each threshold, how many lookups would have
    been HITs and what they would have saved. Scores are of the best candidate that passed
    the guards, so the guards are already applied."""

    lookups: int = 0
    at: list[int] = field(default_factory=lambda: [0] * len(THRESHOLDS))
    usd: list[Decimal] = field(default_factory=lambda: [Decimal(0)] * len(THRESHOLDS))

    def add(self, line: dict[str, Any]) -> None:
        if "semantic" not in line:
            return
        self.lookups += 1
        score = line.get("semantic_score")
        if not isinstance(score, int | float) or isinstance(score, bool):
            return
        value = line.get("saved_usd" if line.get("cache") == "hit" else "cost_usd")
        money = (
            Decimal(repr(value))
            if isinstance(value, int | float) and not isinstance(value, bool)
            else Decimal(0)
        )
        for i, t in enumerate(THRESHOLDS):
            if score >= t:
                self.at[i] += 1
                self.usd[i] += money

    def rows(self) -> list[dict[str, Any]]:
        n = self.lookups
        return [
            {
                "threshold": t,
                "hits": self.at[i],
                "hit_ratio": round(self.at[i] / n, 4) if n else 0.0,
                "usd": float(self.usd[i]),
            }
            for i, t in enumerate(THRESHOLDS)
        ]


@dataclass
class Report:
    by: str
    groups: dict[str, Group] = field(default_factory=dict)
    total: Group = field(default_factory=Group)
    lines: int = 0
    skipped: int = 0
    other_events: int = 0
    """The proxy's own lines other than request.done (image.rehosted, store.unavailable...)."""
    nbytes: int = 0
    seconds: float = 0.0
    scores: Scores = field(default_factory=Scores)

    def feed(self, raw: bytes, since: float | None, until: float | None) -> None:
        self.lines += 1
        self.nbytes += len(raw)
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.skipped += 1
            return
        if not isinstance(line, dict) or "event" not in line:
            self.skipped += 1
            return
        if line["event"] != "request.done":
            self.other_events += 1
            return
        ts = line.get("ts")
        if (since is not None or until is not None) and not isinstance(ts, int | float):
            self.skipped += 1
            return
        if since is not None and ts < since:  # type: ignore[operator]
            return
        if until is not None and ts >= until:  # type: ignore[operator]
            return
        if self.by == "day":
            key = dt.datetime.fromtimestamp(float(ts or 0), dt.UTC).date().isoformat()
        else:
            key = str(line.get(self.by) or "-")
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group()
        group.add(line)
        self.total.add(line)
        self.scores.add(line)

    def rows(self) -> list[dict[str, Any]]:
        out = [{self.by: k, **g.row()} for k, g in sorted(self.groups.items())]
        out.append({self.by: "all", **self.total.row()})
        return out

    def throughput(self) -> dict[str, float]:
        secs = max(self.seconds, 1e-9)
        return {
            "lines": self.lines,
            "skipped": self.skipped,
            "other_events": self.other_events,
            "mb": round(self.nbytes / 1e6, 1),
            "seconds": round(self.seconds, 2),
            "mb_per_s": round(self.nbytes / 1e6 / secs, 1),
            "lines_per_s": round(self.lines / secs),
        }


def open_log(name: str) -> tuple[IO[bytes], IO[bytes]]:
    """(the raw file, its lines): gzip is recognised by its magic bytes; - is stdin."""
    raw: IO[bytes]
    if name == "-":
        raw = sys.stdin.buffer
        head = sys.stdin.buffer.peek(2)[:2] if hasattr(sys.stdin.buffer, "peek") else b""
    else:
        raw = open(name, "rb")  # noqa: SIM115 -- closed by the caller
        head = raw.read(2)
        raw.seek(0)
    if head == b"\x1f\x8b":
        return raw, gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    return raw, raw


def _when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"report: {value!r} is not an ISO date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def run(names: list[str], by: str, since: str | None, until: str | None, progress: bool) -> Report:
    report = Report(by=by)
    lo, hi = _when(since), _when(until)
    t0 = time.perf_counter()
    sized = progress and "-" not in names
    from rich.progress import Progress, TransferSpeedColumn

    with Progress(
        *Progress.get_default_columns(), TransferSpeedColumn(), transient=True, disable=not sized
    ) as bar:
        total = sum(Path(n).stat().st_size for n in names) if sized else None
        task = bar.add_task("reading logs", total=total)
        done = 0
        for name in names:
            raw, lines = open_log(name)
            try:
                for i, line in enumerate(lines):
                    report.feed(line, lo, hi)
                    if sized and i % 20000 == 0:
                        bar.update(task, completed=done + raw.tell())
            finally:
                if raw is not sys.stdin.buffer:
                    raw.close()
            if sized:
                done += Path(name).stat().st_size
                bar.update(task, completed=done)
    report.seconds = time.perf_counter() - t0
    return report


def render(report: Report, fmt: str, out: IO[str], width: int | None = None) -> None:
    rows = report.rows()
    if fmt == "json":
        out.write(
            orjson.dumps(
                {
                    "by": report.by,
                    "rows": rows,
                    "semantic_scores": {
                        "lookups": report.scores.lookups,
                        "thresholds": report.scores.rows(),
                    },
                    "throughput": report.throughput(),
                }
            ).decode()
            + "\n"
        )
        return
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return
    from rich.console import Console
    from rich.table import Table

    width = width or shutil.get_terminal_size((100, 24)).columns
    cells = [{c: _cell(c, row[c]) for c in (report.by, *COLUMNS)} for row in rows]
    shown = _fit([report.by, *COLUMNS], cells, width)
    left_out = len(COLUMNS) + 1 - len(shown)
    caption = f"{left_out} more columns: a wider terminal or --format json" if left_out else None
    table = Table(title=f"cache report by {report.by}", caption=caption, pad_edge=False)
    for col in shown:
        table.add_column(HEADERS.get(col, col), justify="left" if col == report.by else "right")
    for cell in cells:
        table.add_row(*(cell[c] for c in shown))
    console = Console(file=out, width=width)
    console.print(table)
    if report.scores.lookups:
        console.print(_scores_table(report.scores))


def _scores_table(scores: Scores) -> Any:
    """Semantic lookups by threshold: pick a rule's semantic_threshold from data."""
    from rich.table import Table

    table = Table(
        title=f"semantic lookups ({scores.lookups}): HITs had the threshold been",
        pad_edge=False,
    )
    for name in ("threshold", "hits", "hit %", "saved $"):
        table.add_column(name, justify="right")
    for row in scores.rows():
        table.add_row(
            f"{row['threshold']:.2f}",
            str(row["hits"]),
            f"{row['hit_ratio'] * 100:.1f}",
            usd(row["usd"]),
        )
    return table


COLUMNS = (
    "requests",
    "hit_ratio",
    "saved_usd",
    "spent_usd",
    "errors",
    "hits",
    "misses",
    "stale",
    "hit_p50_ms",
    "miss_p50_ms",
    "coalesced",
    "tokens_in_saved",
    "tokens_out_saved",
    "tokens_in_spent",
    "tokens_out_spent",
    "hit_p95_ms",
    "miss_p95_ms",
    "semantic_hits",
    "shadow_hit_ratio",
    "shadow_saved_usd",
    "shadow_lookups",
    "verify_calls",
    "verify_p50_ms",
    "verify_usd",
    "provider_saved_usd",
    "provider_cached_tokens",
    "partial",
    "items_cached",
    "items_sent",
)
"""Table columns, most wanted first: a narrow terminal shows the first ones that fit."""
HEADERS = {
    "hit_ratio": "hit %",
    "saved_usd": "saved $",
    "spent_usd": "spent $",
    "hit_p50_ms": "hit p50 ms",
    "miss_p50_ms": "miss p50 ms",
    "hit_p95_ms": "hit p95 ms",
    "miss_p95_ms": "miss p95 ms",
    "tokens_in_saved": "in saved",
    "tokens_out_saved": "out saved",
    "tokens_in_spent": "in spent",
    "tokens_out_spent": "out spent",
    "semantic_hits": "sem hits",
    "shadow_hit_ratio": "shadow hit %",
    "shadow_saved_usd": "shadow saved $",
    "shadow_lookups": "shadow lookups",
    "verify_calls": "verify calls",
    "verify_p50_ms": "verify p50 ms",
    "verify_usd": "verify $",
    "provider_saved_usd": "provider saved $",
    "provider_cached_tokens": "provider cached",
    "items_cached": "items cached",
    "items_sent": "items sent",
}


def usd(value: float) -> str:
    """Dollars in fixed notation with at least 3 significant digits (never 2.9e-05)."""
    if value == 0:
        return "0"
    digits = max(2, 3 - math.floor(math.log10(abs(value))))
    return f"{value:,.{digits}f}"


def _cell(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if col.endswith("_usd"):
        return usd(float(value))
    if col in ("hit_ratio", "shadow_hit_ratio"):
        return f"{value * 100:.1f}"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def _fit(columns: list[str], cells: list[dict[str, str]], width: int) -> list[str]:
    """The leading columns whose widths (3 characters of border each) fit `width`."""
    shown: list[str] = []
    used = 1
    for col in columns:
        need = max(len(HEADERS.get(col, col)), *(len(c[col]) for c in cells)) + 3
        if used + need > width and shown:
            break
        shown.append(col)
        used += need
    return shown


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy report", description=__doc__)
    p.add_argument("files", nargs="*", default=["-"], help="log files (plain or .gz); - is stdin")
    p.add_argument("--by", choices=GROUPS, default="route")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--since", help="ISO date/time (UTC unless it says otherwise)")
    p.add_argument("--until", help="ISO date/time, exclusive")
    args = p.parse_args(argv)
    for name in args.files:
        if name != "-" and not Path(name).is_file():
            print(f"report: {name}: no such file", file=sys.stderr)
            return 2
    report = run(args.files, args.by, args.since, args.until, progress=sys.stderr.isatty())
    render(report, args.format, sys.stdout)
    t = report.throughput()
    print(
        f"read {t['lines']} lines ({t['mb']} MB) in {t['seconds']} s: {t['mb_per_s']} MB/s, "
        f"{t['lines_per_s']} lines/s; {t['other_events']} other events of the proxy; "
        f"{t['skipped']} lines were not the proxy's and were skipped",
        file=sys.stderr,
    )
    return 0

"""GET /_proxy/metrics: the Stats counters in the Prometheus text format.

A collector reads Stats at scrape time, so the log line, /_proxy/stats and the metrics can
never disagree. Labels: route (a rule's route or "other"), model (bounded), cache status.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.cache import Cache
from proxy.stats import LATENCY_BUCKETS_S, Stats


class Observed(Protocol):
    """What the metrics read of the running proxy (handlers.State is one)."""

    @property
    def stats(self) -> Stats: ...
    @property
    def cache(self) -> Cache: ...
    @property
    def flights(self) -> Sized: ...


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatsCollector(Collector):
    def __init__(self, state: Observed, stats: Stats | None = None) -> None:
        self.state = state
        self.stats = stats
        """The counters to show (every worker's, added up); None: this process's."""

    def collect(self) -> Iterator[Metric]:
        """Every metric, read from the counters and the store at scrape time."""
        stats = self.stats if self.stats is not None else self.state.stats
        yield from _requests(stats)
        yield from _spent_saved(stats)
        yield _embedding_items(stats)
        yield _latency(stats)
        yield from _store_health(self.state.cache)
        in_flight = GaugeMetricFamily("ocp_flights", "Upstream answers in flight in this process.")
        in_flight.add_metric([], len(self.state.flights))
        yield in_flight


def _requests(stats: Stats) -> tuple[Metric, Metric]:
    """Requests and error answers by route, model and cache status."""
    labels = ["route", "model", "cache"]
    requests = CounterMetricFamily(
        "ocp_requests", "Requests by route, model and cache status.", labels=labels
    )
    errors = CounterMetricFamily("ocp_errors", "Answers with status >= 400.", labels=labels)
    for (route, model, cache), t in sorted(stats.cells.items()):
        requests.add_metric([route, model, cache], t.requests)
        errors.add_metric([route, model, cache], t.errors)
    return requests, errors


def _spent_saved(stats: Stats) -> tuple[Metric, Metric]:
    """Tokens and US dollars spent and saved by route and model (cache statuses added up)."""
    tokens = CounterMetricFamily(
        "ocp_tokens",
        "Tokens spent upstream (MISS) or saved by reuse (HIT, COALESCED); provider_cached:"
        " input tokens the provider's prompt cache served.",
        labels=["route", "model", "direction", "kind"],
    )
    usd = CounterMetricFamily(
        "ocp_usd",
        "US dollars spent upstream or saved; provider_saved: by the provider's prompt cache.",
        labels=["route", "model", "kind"],
    )
    spent_saved: dict[tuple[str, str], list[float]] = {}
    for (route, model, _cache), t in stats.cells.items():
        row = spent_saved.setdefault((route, model), [0, 0, 0, 0, 0.0, 0.0, 0, 0.0])
        row[0] += t.tokens_in_spent
        row[1] += t.tokens_out_spent
        row[2] += t.tokens_in_saved
        row[3] += t.tokens_out_saved
        row[4] += t.usd_spent
        row[5] += t.usd_saved
        row[6] += t.tokens_provider_cached
        row[7] += t.usd_provider_saved
    for (route, model), row in sorted(spent_saved.items()):
        tokens.add_metric([route, model, "in", "spent"], row[0])
        tokens.add_metric([route, model, "out", "spent"], row[1])
        tokens.add_metric([route, model, "in", "saved"], row[2])
        tokens.add_metric([route, model, "out", "saved"], row[3])
        usd.add_metric([route, model, "spent"], round(row[4], 8))
        usd.add_metric([route, model, "saved"], round(row[5], 8))
        if row[6]:  # the provider's own prompt cache, apart from the proxy's savings
            tokens.add_metric([route, model, "in", "provider_cached"], row[6])
            usd.add_metric([route, model, "provider_saved"], round(row[7], 8))
    return tokens, usd


def _embedding_items(stats: Stats) -> Metric:
    """Embeddings items answered one by one, by where they came from."""
    items = CounterMetricFamily(
        "ocp_embedding_items",
        "Embeddings input items answered item by item, by where they came from.",
        labels=["route", "model", "source"],
    )
    per_items: dict[tuple[str, str], list[int]] = {}
    for (route, model, _cache), t in stats.cells.items():
        if t.items_cached or t.items_joined or t.items_sent:
            counts = per_items.setdefault((route, model), [0, 0, 0])
            counts[0] += t.items_cached
            counts[1] += t.items_joined
            counts[2] += t.items_sent
    for (route, model), (cached, joined, sent) in sorted(per_items.items()):
        items.add_metric([route, model, "cache"], cached)
        items.add_metric([route, model, "joined"], joined)
        items.add_metric([route, model, "upstream"], sent)
    return items


def _latency(stats: Stats) -> Metric:
    """The time to answer as a histogram per cache status."""
    latency = HistogramMetricFamily(
        "ocp_request_duration_seconds", "Time to answer, by cache status.", labels=["cache"]
    )
    for status, hist in stats.latency.items():
        cumulative, buckets = 0, []
        for bound, count in zip(LATENCY_BUCKETS_S, hist.counts, strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", hist.count))
        latency.add_metric([status], buckets, hist.sum)
    return latency


def _store_health(store_state: Cache) -> Iterator[Metric]:
    """The store's health: up, its breaker, the writes it refused."""
    store_up = GaugeMetricFamily(
        "ocp_store_up", "1 while the cache store answers, 0 while degraded.", labels=["store"]
    )
    store_up.add_metric([store_state.store.name], 1.0 if store_state.healthy else 0.0)
    yield store_up
    breaker = GaugeMetricFamily(
        "ocp_breaker_open", "1 while the store breaker is open.", labels=["store"]
    )
    breaker.add_metric([store_state.store.name], 0.0 if store_state.healthy else 1.0)
    yield breaker
    skipped = CounterMetricFamily(
        "ocp_store_write_errors",
        "Answers not stored because the store refused the write (reads went on).",
        labels=["store"],
    )
    skipped.add_metric([store_state.store.name], store_state.write_errors)
    yield skipped


def registry_for(state: Observed, stats: Stats | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(state, stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

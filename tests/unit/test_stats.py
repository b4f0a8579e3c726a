"""stats.py on its own: bounded labels."""

from __future__ import annotations


def test_stats_labels_stay_bounded() -> None:
    """100 distinct model names give at most 64 model labels plus "other"; totals add up."""
    from proxy.stats import MAX_MODELS, Stats

    stats = Stats()
    for i in range(100):
        line = {
            "cache": "hit",
            "rule": "/v1/x",
            "model": f"m{i}",
            "status": 200,
            "bytes": 1,
            "tokens_in": 1,
            "tokens_out": 2,
            "saved_usd": 0.5,
            "saved_ms": 3.0,
        }
        stats.record(dict(line), 0.001)
        stats.record(dict(line), 0.001)
    models = {model for _route, model, _cache in stats.cells}
    assert len(models) == MAX_MODELS + 1 and "other" in models
    snap = stats.snapshot()
    assert snap["requests"] == 200 and snap["hits"] == 200 and snap["saved_usd"] == 100.0
    assert snap["tokens"]["out_saved"] == 400 and snap["last_hour"]["served_from_cache"] == 200

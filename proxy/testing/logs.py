"""Synthetic `request.done` log lines, for the report's tests and benchmark."""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/images/generations")
MODELS = ("gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "dall-e-3", "my-finetune")
CACHES = ("hit", "hit", "hit", "miss", "coalesced", "bypass", "refresh")


def lines(n: int, *, seed: int = 7, start_ts: float = 1_767_225_600.0) -> Iterator[bytes]:
    """n JSON lines shaped like the proxy's, one per second from `start_ts` (2026-01-01)."""
    rnd = random.Random(seed)
    for i in range(n):
        cache = CACHES[rnd.randrange(len(CACHES))]
        tin, tout = rnd.randrange(10, 2000), rnd.randrange(1, 800)
        usd = round((tin * 0.15 + tout * 0.6) / 1e6, 8)
        line: dict[str, object] = {
            "cache": cache,
            "route": ROUTES[i % len(ROUTES)],
            "method": "POST",
            "tenant": f"{rnd.randrange(50):012x}",
            "rule": ROUTES[i % len(ROUTES)],
            "model": MODELS[i % len(MODELS)],
            "stream": bool(i % 2),
            "key": f"{rnd.getrandbits(48):012x}",
            "tokens_in": tin,
            "tokens_out": tout,
            "status": 200 if i % 50 else 500,
            "bytes": rnd.randrange(200, 9000),
            "duration_ms": round(
                rnd.uniform(0.1, 2.0) if cache == "hit" else rnd.uniform(200, 3000), 2
            ),
            "ttfb_ms": 0.5,
            "event": "request.done",
            "level": "info",
            "ts": start_ts + i,
        }
        if cache in ("hit", "coalesced"):
            line["saved_usd"] = usd
            line["saved_ms"] = 900.0
        elif i % 50:  # not an error line
            line["cost_usd"] = usd
        yield orjson.dumps(line) + b"\n"

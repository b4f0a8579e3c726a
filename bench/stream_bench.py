"""Time to first byte of a streamed chat answer: HIT (replayed from the cache) against MISS
(relayed live from the fake upstream), through `python -m proxy`, in one run.

    python -m bench.stream_bench [--hits 300] [--misses 40]

The fake upstream answers after --latency seconds and sends 8 chunks --chunk-delay apart.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import orjson

from bench.common import fake_upstream, proxy

HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def body(i: int) -> bytes:
    return orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": f"stream {i}"}],
        }
    )


async def ttfb(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[float, str, bytes]:
    t0 = time.perf_counter()
    async with session.post(url, data=data, headers=HEADERS) as r:
        first = await r.content.readany()
        took = (time.perf_counter() - t0) * 1000
        rest = await r.read()
        return took, r.headers["X-Cache-Status"], first + rest


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def run(base: str, hits: int, misses: int) -> None:
    url = base + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        miss_ms = []
        for i in range(misses):
            took, status, _ = await ttfb(s, url, body(i))
            assert status == "MISS", status
            miss_ms.append(took)
        hit_ms = []
        for i in range(hits):
            took, status, data = await ttfb(s, url, body(i % misses))
            assert status == "HIT", status
            assert data.endswith(b"data: [DONE]\n\n")
            hit_ms.append(took)
    print(f"{'stream TTFB':14} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for label, values in (("MISS", miss_ms), ("HIT", hit_ms)):
        print(f"{label:14} {len(values):5d} {pct(values, 50):8.2f} {pct(values, 99):8.2f}")
    print(f"HIT p50 is {pct(miss_ms, 50) / pct(hit_ms, 50):.0f}x faster than MISS p50")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hits", type=int, default=300)
    p.add_argument("--misses", type=int, default=40)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--chunk-delay", type=float, default=0.02)
    p.add_argument("--cache", default="", help="store URL; default: the embedded SQLite store")
    args = p.parse_args()
    flags = ["--cache", args.cache] if args.cache else []
    with (
        fake_upstream(latency=args.latency, chunk_delay=args.chunk_delay) as upstream,
        proxy(upstream, *flags) as base,
    ):
        asyncio.run(run(base, args.hits, args.misses))


if __name__ == "__main__":
    main()

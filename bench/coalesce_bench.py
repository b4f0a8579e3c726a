"""N simultaneous identical requests, streamed and not: how many reach upstream, and the
p99 latency, through `python -m proxy` in front of a fake upstream that takes 0.5 s.

    python -m bench.coalesce_bench [--n 10 100 1000]
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


async def one(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    async with session.post(url, data=data, headers=HEADERS) as r:
        body = await r.read()
        assert r.status == 200, r.status
        return (time.perf_counter() - t0) * 1000, body


async def calls(session: aiohttp.ClientSession, upstream: str) -> int:
    async with session.get(upstream + "/_fake/stats") as r:
        return int((await r.json())["calls"])


async def run(base: str, upstream: str, sizes: list[int]) -> None:
    url = base + "/v1/chat/completions"
    print(
        f"{'requests':>8} {'stream':>6} {'upstream calls':>14} {'identical':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'wall s':>7}"
    )
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        for stream in (False, True):
            for n in sizes:
                data = orjson.dumps(
                    {
                        "model": "gpt-4o-mini",
                        "stream": stream,
                        "messages": [{"role": "user", "content": f"burst {n} {stream}"}],
                    }
                )
                before = await calls(s, upstream)
                t0 = time.perf_counter()
                results = await asyncio.gather(*(one(s, url, data) for _ in range(n)))
                wall = time.perf_counter() - t0
                used = await calls(s, upstream) - before
                lat = sorted(ms for ms, _ in results)
                same = len({b for _, b in results}) == 1
                p99 = statistics.quantiles(lat, n=100)[98] if n > 1 else lat[0]
                print(
                    f"{n:8d} {stream!s:>6} {used:14d} {same!s:>9} "
                    f"{statistics.median(lat):8.1f} {p99:8.1f} {wall:7.2f}"
                )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--latency", type=float, default=0.5)
    args = p.parse_args()
    with fake_upstream(latency=args.latency, chunk_delay=0.02) as upstream, proxy(upstream) as base:
        asyncio.run(run(base, upstream, args.n))


if __name__ == "__main__":
    main()

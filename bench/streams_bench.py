"""Many long streams through one proxy process: are they all whole, and what does each cost
in memory?

    python -m bench.streams_bench [--streams 2000] [--seconds 6]

The fake upstream streams every chat completion in 12 chunks spread over `--seconds`. One
`python -m proxy` (default SQLite store, JSON log on) carries `--streams` of them at once, each
a new prompt (so each is its own upstream stream, recorded for the cache), from one aiohttp
client. The proxy's RSS is read before (after a warm-up) and every 50 ms while the streams
run; per stream = (peak - before) / streams. A stream is whole when it ends with
`data: [DONE]` after all 12 content chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.common import fake_upstream, rss_mb, start_proxy
from proxy.tasks import spawn

CHUNKS = 12


def body(i: int) -> bytes:
    return orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": f"Tell a long story, number {i}"}],
        }
    )


async def one(http: aiohttp.ClientSession, url: str, i: int) -> bool:
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    async with http.post(url, data=body(i), headers=headers) as r:
        data = await r.read()
    return (
        r.status == 200
        and data.rstrip().endswith(b"data: [DONE]")
        and data.count(b'"content"') >= CHUNKS
    )


async def run(url: str, n: int, pid: int) -> tuple[int, float, float]:
    """(whole streams, peak RSS MB, seconds)."""
    peak = 0.0
    stop = asyncio.Event()
    t_start = time.perf_counter()
    timeline: list[tuple[float, float]] = []

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            now = rss_mb(pid)
            timeline.append((time.perf_counter() - t_start, now))
            peak = max(peak, now)
            await asyncio.sleep(0.05)

    sampler = spawn(sample(), name="rss-sampler")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        results = await asyncio.gather(
            *(one(http, url, i) for i in range(n)), return_exceptions=True
        )
    took = time.perf_counter() - t0
    stop.set()
    await sampler
    if n > 100:
        print("RSS timeline (s, MB):", [(round(t, 1), round(m)) for t, m in timeline[::10]])
    return sum(1 for r in results if r is True), peak, took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("flags", nargs="*", help="more proxy flags (after --)")
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data = Path(tempfile.mkdtemp(prefix="ocp-streams-"))
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(
            fake_upstream(chunks=CHUNKS, chunk_delay=args.seconds / CHUNKS)
        )
        proc, port = start_proxy(upstream, data, *args.flags)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(run(url, 50, proc.pid))  # warm-up: imports, pools, first allocations
        time.sleep(1.0)
        before = rss_mb(proc.pid)
        whole, peak, took = asyncio.run(run(url, args.streams, proc.pid))
        after = rss_mb(proc.pid)
    shutil.rmtree(data, ignore_errors=True)
    per_kb = (peak - before) * 1024 / args.streams
    print(
        f"{args.streams} concurrent {args.seconds:g}-second streams through one proxy process "
        f"(default SQLite store, {CHUNKS} chunks each)"
    )
    print(f"whole: {whole}/{args.streams} in {took:.1f} s")
    print(
        f"RSS: {before:.1f} MB before, {peak:.1f} MB peak, {after:.1f} MB after: "
        f"{per_kb:.1f} KB per stream"
    )


if __name__ == "__main__":
    main()

"""Cache-hit throughput: the proxy answering a stored chat completion, against a bare aiohttp
app answering a fixed body, in one run, with wrk (32 connections by default).

    python -m bench.hit_bench [--seconds 10] [--connections 32]

The proxy runs as `python -m proxy` with its per-request JSON log line on (to /dev/null).
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

import orjson

from bench.common import fake_upstream, free_port, process, proxy, redis_server, wrk

BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Describe a persona"}]}
).decode()


def warm(url: str) -> None:
    req = urllib.request.Request(
        url,
        data=BODY.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
    )
    for _ in range(2):
        with urllib.request.urlopen(req) as r:
            status = r.headers["X-Cache-Status"]
    assert status == "HIT", status


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()
    rows = []
    port = free_port()
    with process([sys.executable, "-m", "bench.servers", "bare", "--port", str(port)], port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wrk(url, BODY, connections=args.connections, seconds=2)  # warm-up
        rows.append(
            ("bare aiohttp app", wrk(url, BODY, connections=args.connections, seconds=args.seconds))
        )
    configs = [
        ("proxy HIT, memory store", ["--cache", "memory://"]),
        ("proxy HIT, SQLite store (default)", []),
    ]
    with fake_upstream() as upstream, redis_server() as redis_url:
        if redis_url:
            configs += [
                ("proxy HIT, Redis, 1 worker", ["--cache", redis_url]),
                ("proxy HIT, Redis, 2 workers", ["--cache", redis_url, "--workers", "2"]),
                ("proxy HIT, Redis, no hot tier", ["--cache", redis_url, "--hot-cache-mb", "0"]),
            ]
        for label, flags in configs:
            with proxy(upstream, *flags) as base:
                url = base + "/v1/chat/completions"
                warm(url)
                wrk(url, BODY, connections=args.connections, seconds=2)
                rows.append(
                    (label, wrk(url, BODY, connections=args.connections, seconds=args.seconds))
                )
    bare_rps = rows[0][1]["rps"]
    print(f"{'':36} {'req/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7}")
    for label, r in rows:
        print(
            f"{label:36} {r['rps']:9.0f} {r['rps'] / bare_rps:6.2f} {r['p50_ms']:7.2f} "
            f"{r['p99_ms']:7.2f} {r['non_2xx']:7.0f}"
        )


if __name__ == "__main__":
    main()

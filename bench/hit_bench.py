"""Cache-hit throughput: the proxy answering a stored chat completion, against a bare aiohttp
app answering a fixed body, in one run, with wrk (32 connections by default).

    python -m bench.hit_bench [--seconds 10] [--connections 32] [--rounds 3]

The proxy runs as `python -m proxy` with its per-request JSON log line on (to /dev/null).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

from bench.common import HIT_BODY as BODY
from bench.common import fake_upstream, free_port, process, proxy, redis_server, warm, wrk


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        port = free_port()
        stack.enter_context(
            process([sys.executable, "-m", "bench.servers", "bare", "--port", str(port)], port)
        )
        urls = {"bare aiohttp app": f"http://127.0.0.1:{port}/v1/chat/completions"}
        upstream = stack.enter_context(fake_upstream())
        redis_url = stack.enter_context(redis_server())
        configs = [
            ("proxy HIT, memory store", ["--cache", "memory://"]),
            ("proxy HIT, SQLite store (default)", []),
        ]
        if redis_url:
            configs += [
                ("proxy HIT, Redis, 1 worker", ["--cache", redis_url]),
                ("proxy HIT, Redis, 2 workers", ["--cache", redis_url, "--workers", "2"]),
                ("proxy HIT, Redis, no hot tier", ["--cache", redis_url, "--hot-cache-mb", "0"]),
            ]
        for label, flags in configs:
            base = stack.enter_context(proxy(upstream, *flags))
            urls[label] = base + "/v1/chat/completions"
            assert warm(urls[label]) == "HIT"
        for url in urls.values():
            wrk(url, BODY, connections=args.connections, seconds=2)  # warm-up
        # Every configuration once per round, in turn: a noisy minute on this shared machine
        # then weighs on every row alike, and each row is the median of its rounds.
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in urls}
        for _ in range(args.rounds):
            for label, url in urls.items():
                runs[label].append(
                    wrk(url, BODY, connections=args.connections, seconds=args.seconds)
                )
    rows = [(label, _median(results)) for label, results in runs.items()]
    bare_rps = rows[0][1]["rps"]
    print(f"medians of {args.rounds} rounds, {args.seconds} s each, {args.connections} connections")
    print(f"{'':36} {'req/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7}")
    for label, r in rows:
        print(
            f"{label:36} {r['rps']:9.0f} {r['rps'] / bare_rps:6.2f} {r['p50_ms']:7.2f} "
            f"{r['p99_ms']:7.2f} {r['non_2xx']:7.0f}"
        )


def _median(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in results) for k in ("rps", "p50_ms", "p99_ms")} | {
        "non_2xx": sum(r["non_2xx"] for r in results)
    }


if __name__ == "__main__":
    main()

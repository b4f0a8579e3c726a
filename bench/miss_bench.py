"""The MISS path: what the proxy adds to a request it must forward, next to a bare aiohttp
pass-through proxy, in one run.

    python -m bench.miss_bench [--seconds 10] [--rounds 3]

Upstream: a bare aiohttp app answering a fixed chat completion at once (bench.servers bare).
In front of it, each measured on its own: nothing (the upstream alone), the bare pass-through
proxy (bench.servers bare-proxy: read the body, one shared ClientSession, stream the answer
back; no key, cache or log), and `python -m proxy` with its JSON log line on, on the default
SQLite store and on the memory store. Every request is a new chat completion (a MISS that is
keyed, coalesced, forwarded, checked, stored and logged). Per round and configuration, wrk
runs at 1 connection (latency: the p50 added over the upstream alone) and at 32 connections
(requests/s); the configurations take turns and each row is the median of its rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import urllib.request

import orjson

from bench.common import free_port, process, proxy, wrk


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        up_port = free_port()
        stack.enter_context(
            process(
                [sys.executable, "-m", "bench.servers", "bare", "--port", str(up_port)], up_port
            )
        )
        upstream = f"http://127.0.0.1:{up_port}"
        bp_port = free_port()
        stack.enter_context(
            process(
                [
                    sys.executable,
                    "-m",
                    "bench.servers",
                    "bare-proxy",
                    "--port",
                    str(bp_port),
                    "--upstream",
                    upstream,
                ],
                bp_port,
            )
        )
        urls = {
            "upstream alone": upstream,
            "bare aiohttp proxy": f"http://127.0.0.1:{bp_port}",
            "proxy MISS, SQLite (default)": stack.enter_context(proxy(upstream)),
            "proxy MISS, memory store": stack.enter_context(
                proxy(upstream, "--cache", "memory://")
            ),
        }
        urls = {k: v + "/v1/chat/completions" for k, v in urls.items()}
        for url in urls.values():
            wrk(url, "", connections=8, seconds=2, unique=True)  # warm-up
        one: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
        many: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
        for _ in range(args.rounds):
            for label, url in urls.items():
                one[label].append(wrk(url, "", connections=1, seconds=args.seconds, unique=True))
                many[label].append(wrk(url, "", connections=32, seconds=args.seconds, unique=True))
        for label, url in urls.items():  # every request was a MISS: no proxy served a HIT
            if label.startswith("proxy"):
                stats = orjson.loads(
                    urllib.request.urlopen(
                        url.replace("/v1/chat/completions", "/_proxy/stats")
                    ).read()
                )
                assert stats["hits"] == 0 and stats["coalesced"] == 0, (label, stats)
    p50 = {k: statistics.median(r["p50_ms"] for r in v) for k, v in one.items()}
    rps = {k: statistics.median(r["rps"] for r in v) for k, v in many.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in many.items()}
    errors = {k: sum(r["non_2xx"] for r in one[k] + many[k]) for k in urls}
    base_p50, bare_rps = p50["upstream alone"], rps["bare aiohttp proxy"]
    print(f"medians of {args.rounds} rounds, {args.seconds} s each; every request a new prompt")
    print(
        f"{'':30} {'p50 ms':>7} {'added':>7} {'req/s':>8} {'vs bare':>8} {'p99 ms':>7} "
        f"{'non-2xx':>7}"
    )
    print(f"{'':30} {'(1 connection)':>15} {'(32 connections)':>25}")
    for label in urls:
        added = p50[label] - base_p50
        print(
            f"{label:30} {p50[label]:7.3f} {added:7.3f} {rps[label]:8.0f} "
            f"{rps[label] / bare_rps:8.2f} {p99[label]:7.2f} {errors[label]:7.0f}"
        )


if __name__ == "__main__":
    main()

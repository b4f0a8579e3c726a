"""A RAG re-run: 2048 texts embedded, then the same 2048 with 10 changed.

    python -m bench.embedding_items_bench [--items 2048] [--changed 10] [--dims 1536]
                                          [--latency-per-item-ms 0.5] [--runs 3]

One `python -m proxy` (the embedded SQLite store) in front of the fake upstream, which runs
in this process and takes `--latency-per-item-ms` per item it embeds (a stand-in for the
provider's time; 0.5 ms an item is ~1 s for 2048). The official SDK's AsyncOpenAI sends
the list (base64, its default). For each run, with a fresh set of texts: the first request
(every item upstream), the re-run with `--changed` items changed, and the same list a third
time; reported: the items the upstream received for each request, its X-Cache-Status and
the client-side time (median over runs). The "whole-list key" column is the same re-run
through a rule with `embeddings_per_item = false` (the behaviour before), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import orjson
from aiohttp import web

from bench.common import proxy
from proxy.testing import FakeOpenAI


class SlowFake(FakeOpenAI):
    """The fake upstream, taking a fixed time per embedded item."""

    per_item_s: float = 0.0

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        inputs = orjson_input(request)
        await asyncio.sleep(self.per_item_s * inputs)
        return await super().embeddings(request)


def orjson_input(request: web.Request) -> int:
    from proxy.testing.fake_openai import BODY

    items = request[BODY].get("input", [])
    return len(items) if isinstance(items, list) else 1


def texts(n: int, run: int) -> list[str]:
    return [
        f"run {run} chunk {i}: section {i % 50} of the handbook, paragraph {i}" for i in range(n)
    ]


async def one_case(base: str, fake: FakeOpenAI, args: Any, run: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(
        base_url=base + "/v1", api_key="sk-bench", max_retries=0, timeout=300
    )
    out: dict[str, Any] = {}
    try:
        first = texts(args.items, run)
        step = max(1, args.items // args.changed)
        changed = [
            f"edited {j} of run {run}" if j % step == 0 and j // step < args.changed else t
            for j, t in enumerate(first)
        ]
        for name, inputs in (("first", first), ("rerun", changed), ("again", changed)):
            calls = len(fake.calls)
            t0 = time.perf_counter()
            raw = await client.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input=inputs, dimensions=args.dims
            )
            ms = (time.perf_counter() - t0) * 1000
            assert len(raw.parse().data) == len(inputs)
            sent = sum(len(c.json()["input"]) for c in fake.calls[calls:])
            out[name] = (raw.headers["x-cache-status"], sent, ms)
    finally:
        await client.close()
    return out


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--changed", type=int, default=10)
    p.add_argument("--dims", type=int, default=1536)
    p.add_argument("--latency-per-item-ms", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache", default="", help="the proxy's --cache (default: embedded SQLite)")
    args = p.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    for per_item in (True, False):
        fake = SlowFake()
        fake.per_item_s = args.latency_per_item_ms / 1000
        upstream = await fake.start()
        rules = Path(tempfile.mkdtemp(prefix="ocp-bench-")) / "rules.toml"
        option = "" if per_item else "embeddings_per_item = false\n"
        rules.write_text(f'[[rule]]\nroute = "/v1/embeddings"\n{option}')
        label = "per item" if per_item else "whole-list key"
        try:
            flags = ["--rules", str(rules), "--max-body-mb", "256"]
            if args.cache:
                flags += ["--cache", args.cache]
            log = Path(tempfile.mkdtemp(prefix="ocp-bench-")) / "proxy.log"
            with proxy(upstream, *flags, log_to=str(log)) as base:
                results[label] = [await one_case(base, fake, args, run) for run in range(args.runs)]
        finally:
            await fake.stop()
        lines = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
        done = [x for x in lines if x.get("event") == "request.done"]
        for i, run in enumerate(results[label]):  # the proxy's own time, from its lines
            for j, name in enumerate(("first", "rerun", "again")):
                line = done[3 * i + j]
                run[name] = (*run[name], line["duration_ms"], line.get("upstream_ms") or 0.0)
    print(
        f"{args.items} items of {args.dims} dims, {args.changed} changed; "
        f"upstream {args.latency_per_item_ms} ms an item; median of {args.runs} runs"
    )
    print(
        f"{'':16} {'request':8} {'status':9} {'items upstream':>15} {'client ms':>10}"
        f" {'proxy ms':>9} {'of it upstream':>15}"
    )
    for label, runs in results.items():
        for name in ("first", "rerun", "again"):
            status, sent = runs[0][name][:2]
            ms, proxy_ms, up_ms = (statistics.median(r[name][k] for r in runs) for k in (2, 3, 4))
            print(
                f"{label:16} {name:8} {status:9} {sent:>15} {ms:>10.1f} {proxy_ms:>9.1f}"
                f" {up_ms:>15.1f}"
            )


if __name__ == "__main__":
    asyncio.run(main())

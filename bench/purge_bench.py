"""Purge a namespace among a million entries in Redis, while HITs go on.

    python -m bench.purge_bench [--entries 1000000] [--seconds 10]

Fills Redis with `--entries` answers in one namespace (written straight into Redis under the
proxy's key layout, in pipelines), plus the answer the HIT load asks for in another. Then wrk
runs HITs (hot tier off, so every HIT asks Redis) twice: once alone, once while
`POST /_proxy/purge {"namespace": ...}` runs. Reports the purge time and the HIT latency
(p50, p99, worst) with and without it.
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time
import urllib.request

import orjson
import redis

from bench.common import HIT_BODY as BODY
from bench.common import fake_upstream, proxy, redis_server, warm, wrk
from proxy.keys import tag
from proxy.models import CachedResponse

TOKEN = "bench-admin"


def fill(url: str, entries: int) -> None:
    r = redis.Redis.from_url(url)
    value = CachedResponse(200, (("Content-Type", "application/json"),), b"{}", time.time())
    raw = value.to_bytes()
    prefix = (
        f"ocp:resp:v2:{'0' * 12}.{tag('bulk')}.{tag('gpt-4o-mini')}.{tag('/v1/chat/completions')}."
    )
    pipe = r.pipeline(transaction=False)
    for i in range(entries):
        pipe.set(prefix + secrets.token_hex(32), raw, px=3_600_000)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    print(f"filled {r.dbsize()} keys")
    r.close()


def purge(base: str) -> tuple[float, dict[str, int]]:
    req = urllib.request.Request(
        base + "/_proxy/purge",
        data=orjson.dumps({"namespace": "bulk"}),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=600) as resp:
        body = orjson.loads(resp.read())
    return time.monotonic() - t0, body


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--seconds", type=int, default=10)
    args = p.parse_args()
    with (
        redis_server() as rurl,
        fake_upstream() as up,
        proxy(up, "--cache", rurl, "--hot-cache-mb", "0", "--admin-token", TOKEN) as base,
    ):
        url = base + "/v1/chat/completions"
        assert warm(url) == "HIT"
        t0 = time.monotonic()
        fill(rurl, args.entries)
        print(f"fill took {time.monotonic() - t0:.1f} s")
        alone = wrk(url, BODY, connections=32, seconds=args.seconds)
        result: dict[str, object] = {}

        def run_purge() -> None:
            time.sleep(1.0)
            result["took"], result["body"] = purge(base)

        t = threading.Thread(target=run_purge)
        t.start()
        during = wrk(url, BODY, connections=32, seconds=args.seconds)
        t.join()
        left = redis.Redis.from_url(rurl).dbsize()
    print(
        f"purge of namespace 'bulk': {result['body']} in {result['took']:.1f} s; keys left {left}"
    )
    head = ("HITs (wrk -c32, hot tier off)", "req/s", "p50 ms", "p99 ms", "max ms")
    print(f"{head[0]:34} " + " ".join(f"{h:>7}" for h in head[1:]))
    for name, r in (("alone", alone), ("while purging", during)):
        cells = f"{r['rps']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['max_ms']:7.1f}"
        print(f"{name:34} {cells}")


if __name__ == "__main__":
    main()

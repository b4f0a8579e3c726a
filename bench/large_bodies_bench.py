"""Large bodies: /_proxy/health latency while 4 clients send 15 MB nested-array JSON bodies.

    python -m bench.large_bodies_bench [--seconds 10] [--mb 15]

Four client processes loop, each sending chat requests whose body is a 15 MB JSON object
(a `metadata` of nested arrays of numbers, the costliest kind for a JSON parser), a new one
every time (a counter in front), so no memo spares the parse; the fake upstream answers at
once. Meanwhile one client asks /_proxy/health every 20 ms; the same probe runs with no
load first, so the two p99 figures come from one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time
from typing import Any

from bench.common import fake_upstream, proxy

CHAT = "/v1/chat/completions"


def body(mb: float, n: int) -> bytes:
    """A chat request of about `mb` MB: nested arrays of small numbers in `metadata`."""
    row = b"[" + b",".join(str(i).encode() for i in range(10)) + b"]"
    group = b"[" + b",".join([row] * 10) + b"]"
    count = int(mb * 1024 * 1024) // (len(group) + 1)
    blob = b"[" + b",".join([group] * count) + b"]"
    head = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"big %d"}],' % n
    return head + b'"metadata":{"blob":' + blob + b"}}"


def send(port: int, data: bytes) -> int:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nAuthorization: Bearer sk-x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head.encode() + data)
        first = s.recv(64)
        while s.recv(65536):
            pass
    return int(first.split(b" ", 2)[1]) if first else 0


def client(port: int, mb: float, k: int, stop: Any, counts: Any) -> None:
    """One client process: send a new large body until told to stop."""
    template = body(mb, 0)
    n = 0
    while not stop.is_set():
        n += 1
        data = template.replace(b'"big 0"', b'"big %d-%08d"' % (k, n), 1)
        send(port, data)
        with counts.get_lock():
            counts[k] += 1


def probe(port: int, seconds: float) -> list[float]:
    """Milliseconds per GET /_proxy/health, one every 20 ms for `seconds`."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /_proxy/health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            while s.recv(65536):
                pass
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.02)
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 2 else max(values)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--mb", type=float, default=15)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    with fake_upstream(latency=0.0) as up, proxy(up, "--max-body-mb", "64") as url:
        port = int(url.rsplit(":", 1)[1])
        quiet = probe(port, 3)
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        counts = ctx.Array("i", args.clients)
        clients = [
            ctx.Process(target=client, args=(port, args.mb, k, stop, counts), daemon=True)
            for k in range(args.clients)
        ]
        for c in clients:
            c.start()
        time.sleep(1.0)
        loaded = probe(port, args.seconds)
        stop.set()
        for c in clients:
            c.join(120)
        print(f"health p50/p99, quiet:  {statistics.median(quiet):.2f} / {p99(quiet):.2f} ms")
        print(
            f"health p50/p99, {args.clients} clients x {args.mb:g} MB bodies: "
            f"{statistics.median(loaded):.2f} / {p99(loaded):.2f} ms (max {max(loaded):.1f} ms, "
            f"{len(loaded)} probes; large requests sent: {sum(counts)})"
        )


if __name__ == "__main__":
    main()

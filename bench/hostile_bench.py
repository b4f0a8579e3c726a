"""Hostile input: /_proxy/health latency while clients send pathological bodies, and the
proxy's memory before and after requests with megabyte-long model names.

    python -m bench.hostile_bench [--seconds 10] [--names 300]

Four attacker processes loop, each on its own kind of body: deeply nested JSON, a flat JSON
array of 3 million numbers (6 MB), a 20,000-part multipart body, and a 1 MB gzip bomb that
would inflate to 1 GiB. Meanwhile one client asks /_proxy/health every 20 ms; the same probe
also runs with no attack first, so the two p99 figures come from one run.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import fake_upstream, proxy

CHAT = "/v1/chat/completions"


def send(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    head = f"POST {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nAuthorization: Bearer sk-x\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode() + body)
        first = s.recv(64)
        while s.recv(65536):
            pass
    return int(first.split(b" ", 2)[1]) if first else 0


def bodies() -> list[tuple[str, bytes, dict[str, str]]]:
    json_h = {"Content-Type": "application/json"}
    deep = b'{"model":"m","x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    flat = b'{"model":"m","x":[' + b"0," * 3_000_000 + b"0]}"
    part = '--bnd\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'
    multipart = (part * 20_000 + "--bnd--\r\n").encode()
    bomb = gzip.compress(b"\0" * (1024 * 1024 * 1024), compresslevel=9)
    return [
        (CHAT, deep, json_h),
        (CHAT, flat, json_h),
        ("/v1/images/edits", multipart, {"Content-Type": "multipart/form-data; boundary=bnd"}),
        (CHAT, bomb, {**json_h, "Content-Encoding": "gzip"}),
    ]


KINDS = ("deep JSON", "flat JSON", "20k-part multipart", "gzip bomb")
BODIES: list[tuple[str, bytes, dict[str, str]]] = []
"""Built once before the attacker processes fork (the bomb takes seconds to compress)."""


def attack(port: int, kind: int, stop: Any, counts: Any) -> None:
    """One attacker process: send its kind of body until told to stop (401/400/413 expected)."""
    path, body, headers = BODIES[kind]
    while not stop.is_set():
        send(port, path, body, headers)
        with counts.get_lock():
            counts[kind] += 1


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


def rss_kb(port: int) -> int:
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            cmd = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        argv = cmd.split(b"\0")
        if b"proxy" in argv and str(port).encode() in argv:
            for line in (pid / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    raise RuntimeError("proxy process not found")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--names", type=int, default=300)
    args = p.parse_args()
    with fake_upstream(latency=0.0) as up, proxy(up, "--max-body-mb", "64") as url:
        port = int(url.rsplit(":", 1)[1])
        quiet = probe(port, 3)
        BODIES[:] = bodies()
        stop = multiprocessing.get_context("fork").Event()
        ctx = multiprocessing.get_context("fork")
        counts = ctx.Array("i", 4)
        attackers = [
            ctx.Process(target=attack, args=(port, i, stop, counts), daemon=True) for i in range(4)
        ]
        for a in attackers:
            a.start()
        time.sleep(1.0)
        loaded = probe(port, args.seconds)
        stop.set()
        for a in attackers:
            a.join(60)
        print(f"health p50/p99, quiet:  {statistics.median(quiet):.2f} / {p99(quiet):.2f} ms")
        print(
            f"health p50/p99, attack: {statistics.median(loaded):.2f} / {p99(loaded):.2f} ms "
            f"(max {max(loaded):.1f} ms; hostile requests per kind: "
            f"{dict(zip(KINDS, counts, strict=True))})"
        )

        readings = [rss_kb(port)]
        for rnd in range(2):  # two rounds: growth per round, not allocator warm-up, is a leak
            for i in range(args.names):
                body = orjson.dumps({"model": f"{rnd}-{i}-" + "m" * 1_000_000, "messages": []})
                headers = {"Content-Type": "application/json", "X-Cache-Namespace": "n" * 4000}
                send(port, CHAT, body, headers)
            readings.append(rss_kb(port))
        mb = [r / 1024 for r in readings]
        print(
            f"RSS, {args.names} requests of 1 MB model names per round: {mb[0]:.1f} MB before, "
            f"{mb[1]:.1f} MB after round 1, {mb[2]:.1f} MB after round 2"
        )


if __name__ == "__main__":
    main()

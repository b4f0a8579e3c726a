"""python -m proxy: run the proxy (and its subcommands)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.errors import ConfigError
from proxy.log import configure_logging
from proxy.settings import Settings


def serve(settings: Settings) -> None:
    from proxy.app import create_app

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # not on every platform; asyncio's loop works too
        pass
    app = create_app(settings)
    print(
        f"openai-cache-proxy on http://{settings.host}:{settings.port}  "
        f"(upstream {settings.upstream}; set OPENAI_BASE_URL=http://{settings.host}:{settings.port}/v1)",
        file=sys.stderr,
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        reuse_port=settings.workers > 1 or None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_args(args)
        configure_logging(settings.log_format)
        serve(settings)
    except ConfigError as exc:
        print(f"openai-cache-proxy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

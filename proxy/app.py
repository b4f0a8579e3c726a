"""create_app(settings): the aiohttp application, its state and its lifecycle."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import __version__
from proxy import log as logmod
from proxy.cache import Cache
from proxy.coalesce import Flights
from proxy.errors import ConfigError
from proxy.fetch import Fetcher
from proxy.handlers import STATE, State, json_error, proxy_handler
from proxy.rules import load_rules
from proxy.settings import Settings
from proxy.stats import Stats
from proxy.stores import open_store
from proxy.tasks import spawn
from proxy.upstream import Upstream

log = structlog.get_logger()

ADMIN_PATHS = ("/_proxy/stats", "/_proxy/metrics", "/_proxy/dashboard")


def load_secret(settings: Settings) -> bytes:
    """The HMAC secret: PROXY_SECRET if given, else a random one kept (0600) in the data dir."""
    if settings.secret:
        return settings.secret.encode()
    path: Path = settings.data_dir / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(f"--data-dir / PROXY_DATA_DIR: {path} is not a hex secret") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value.hex())
    return value


def build_state(settings: Settings) -> State:
    """Everything the handler needs; raises ConfigError on a bad setting or rule."""
    rules = load_rules(settings.rules)
    secret = load_secret(settings)
    cache = Cache(open_store(settings.cache, settings.data_dir))
    upstream = Upstream(
        settings.upstream,
        connect_timeout_s=settings.upstream_connect_timeout_s,
        read_timeout_s=settings.upstream_read_timeout_s,
    )
    flights = Flights()
    fetcher = Fetcher(upstream, cache, flights, detached_max_s=settings.detached_max_s)
    return State(
        settings=settings,
        rules=rules,
        secret=secret,
        cache=cache,
        upstream=upstream,
        flights=flights,
        fetcher=fetcher,
        stats=Stats(),
    )


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With --admin-token set, stats, metrics and the dashboard need `Authorization: Bearer`."""
    if request.path.startswith(ADMIN_PATHS):
        token = request.app[STATE].settings.admin_token
        if token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return json_error(
                    401,
                    "This page needs the proxy's admin token.",
                    "invalid_request_error",
                    "admin_token_required",
                )
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body = {
        "status": "ok" if st.cache.healthy else "degraded",
        "store": {"backend": st.cache.store.name, "state": st.cache.state},
        "upstream": st.upstream.base_url,
        "version": __version__,
        "in_flight": len(st.flights),
    }
    return web.json_response(body, dumps=_dumps)


async def stats(request: web.Request) -> web.Response:
    st = request.app[STATE]
    snap = st.stats.snapshot()
    snap["store"] = {"backend": st.cache.store.name, "state": st.cache.state}
    return web.json_response(snap, dumps=_dumps)


def _dumps(obj: object) -> str:
    import orjson

    return orjson.dumps(obj).decode()


def create_app(settings: Settings, state: State | None = None) -> web.Application:
    """The proxy as an aiohttp app. Raises ConfigError for bad settings or rules."""
    state = state or build_state(settings)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[admin_guard])
    app[STATE] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        flusher = spawn(logmod.flusher(), name="log-flusher")
        yield
        flusher.cancel()
        await state.upstream.aclose()
        await state.cache.aclose()
        logmod.flush()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/_proxy/health", health)
    app.router.add_get("/_proxy/stats", stats)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app

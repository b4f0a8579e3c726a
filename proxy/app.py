"""create_app(settings): the aiohttp application, its state and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog
from aiohttp import web

from proxy import __version__
from proxy import log as logmod
from proxy.auth import CredentialCheck
from proxy.bus import RedisBus
from proxy.cache import Cache
from proxy.caller_keys import Request as CallerRequest
from proxy.coalesce import Flights
from proxy.cost import Prices
from proxy.errors import ConfigError, StoreUnavailable
from proxy.fetch import Fetcher
from proxy.handlers import State, json_error, proxy_handler
from proxy.images import LocalImageStore, open_image_store
from proxy.images.base import NAME_RE
from proxy.images.rehost import ImageRehoster
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.metrics import registry_for, render
from proxy.rules import default_rules_path, load_rules
from proxy.secret import NAME as SECRET_NAME
from proxy.secret import SecretMismatch, agree, record_of
from proxy.server import GuardedServer
from proxy.settings import Settings
from proxy.state import Planner, Workers
from proxy.stats import Shared, Stats
from proxy.stores import MemoryStore, open_store
from proxy.stores.base import Store
from proxy.stores.redis import RedisStore
from proxy.tasks import spawn
from proxy.upstream import Upstream
from proxy.vectors import Embedder, Semantic, VectorIndex, Verifier

log = structlog.get_logger()


def load_secret(settings: Settings) -> bytes:
    """The HMAC secret this instance proposes: PROXY_SECRET if given, else a random one kept
    (0600) in the data dir. At start-up the store may hand back another (see proxy.secret)."""
    if settings.secret:
        return settings.secret.encode()
    path: Path = settings.data_dir / "secret.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise ConfigError(f"--data-dir / PROXY_DATA_DIR: {path} is not a hex secret") from None
    value = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker wrote it first
        return bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(
            f"--data-dir / PROXY_DATA_DIR: cannot write the key secret in {path.parent}: "
            f"{exc.strerror}"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(value.hex())
    return value


def build_state(settings: Settings) -> State:
    """Everything the handler needs; raises ConfigError on a bad setting or rule."""
    rules = load_rules(settings.rules)
    secret = load_secret(settings)
    store = open_store(settings.cache, settings.data_dir)
    cache = _cache(settings, store)
    upstream = Upstream(
        settings.upstream,
        connect_timeout_s=settings.upstream_connect_timeout_s,
        read_timeout_s=settings.upstream_read_timeout_s,
        ca_file=settings.upstream_ca_file,
    )
    rehoster = _rehoster(settings)
    bus = _bus(settings, store)
    flights = Flights()
    rules_dir = settings.rules if settings.rules and settings.rules.is_dir() else None
    prices = Prices.load((rules_dir or default_rules_path()) / "prices.toml")
    fetcher = Fetcher(
        upstream,
        cache,
        flights,
        detached_max_s=settings.detached_max_s,
        prices=prices,
        image_timeout_s=settings.image_timeout_s,
    )
    planner = Planner(
        rules,
        secret,
        max_body=settings.max_body_bytes,
        max_body_mb=settings.max_body_mb,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        workers=Workers(),
    )
    state = State(
        settings=settings,
        planner=planner,
        cache=cache,
        upstream=upstream,
        flights=flights,
        fetcher=fetcher,
        stats=Stats(),
        rehoster=rehoster,
        bus=bus,
        auth=CredentialCheck(upstream, settings.auth_recheck_s)
        if settings.auth_recheck_s > 0
        else None,
    )
    if any(r.semantic != "off" for r in rules.rules):
        state.semantic = _semantic(settings, state, prices)
    return state


def _cache(settings: Settings, store: Store) -> Cache:
    """The cache over `store`, with an in-memory hot tier in front (the store itself when it
    is in memory)."""
    hot = None
    if isinstance(store, MemoryStore):
        hot = store  # the store is the hot tier itself
    elif settings.hot_cache_mb > 0:
        hot = MemoryStore(max_bytes=int(settings.hot_cache_mb * 1024 * 1024))
    return Cache(store, hot=hot, hot_ttl_s=settings.hot_cache_ttl_s, breaker_s=settings.breaker_s)


def _rehoster(settings: Settings) -> ImageRehoster:
    """The image store and the rehoster that copies generated images into it."""
    images = open_image_store(
        settings.images,
        settings.data_dir,
        public_url=settings.public_url,
        images_public_url=settings.images_public_url,
        s3_endpoint_url=settings.s3_endpoint_url,
    )
    return ImageRehoster(
        images,
        allowed_hosts=settings.image_source_hosts,
        max_bytes=int(settings.image_max_mb * 1024 * 1024),
    )


def _bus(settings: Settings, store: Store) -> RedisBus | None:
    """The bus between instances (a Redis store only: else there is one instance)."""
    if not isinstance(store, RedisStore):
        return None
    return RedisBus(
        store.blocking_client(),
        ready=store.blocking_ready,
        prefix=store.prefix,
        lease_s=settings.lease_s,
        breaker_s=settings.breaker_s,
    )


def _semantic(settings: Settings, state: State, prices: Prices) -> Semantic:
    """The semantic cache: the vector index, the embedder (and its embeddings servers) and
    the verifier when a rule asks for one."""
    rules, cache, upstream = state.planner.rules, state.cache, state.upstream
    index = VectorIndex(
        cache,
        keep=settings.semantic_max_entries,
        max_bytes=int(settings.semantic_memory_mb * 1024 * 1024),
        cpu=state.workers.cpu,
    )
    urls = {settings.semantic_embeddings_url}
    urls |= {r.semantic_embeddings_url for r in rules.rules if r.semantic != "off"}
    servers = {
        url: Upstream(
            url,
            connect_timeout_s=settings.upstream_connect_timeout_s,
            read_timeout_s=settings.semantic_timeout_s,
        )
        for url in sorted(urls - {""})
    }
    embedder = Embedder(
        upstream,
        cache,
        rules,
        state.planner.secret,
        prices,
        timeout_s=settings.semantic_timeout_s,
        servers=servers,
        default_server=settings.semantic_embeddings_url,
        local_key=settings.semantic_embeddings_key,
    )
    verifier = None
    if any(r.semantic_verify == "llm" for r in rules.rules):
        verifier = Verifier(upstream, prices, timeout_s=settings.semantic_verify_timeout_s)
    planner = state.planner
    return Semantic(embedder, index, cache, planner.mac_key, planner.workers.cpu, verifier=verifier)


UNSHARED = (
    "the key secret could not be read from the store yet: this instance makes keys of its "
    "own until the store answers"
)


def adopt_secret(st: State, secret: bytes) -> None:
    """Make keys and tenant ids with `secret` from now on (the store's shared one)."""
    st.planner.rekey(secret)
    if st.semantic is not None:
        st.semantic.embedder.secret = secret
        st.semantic.mac_key = st.planner.mac_key


AdminHandler = Callable[[State, web.BaseRequest], Awaitable[web.StreamResponse]]


def from_loopback(request: web.BaseRequest) -> bool:
    """The client's address is a loopback one (127.0.0.0/8, ::1, or ::ffff:127.x.y.z); a
    Unix socket or an unknown peer is not."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def admin_only(handler: AdminHandler) -> AdminHandler:
    """The admin door. With --admin-token set, the wrapped page needs `Authorization: Bearer
    <token>` (or ?token= from a browser); without one, it answers clients on loopback only."""

    async def guarded(st: State, request: web.BaseRequest) -> web.StreamResponse:
        token = st.settings.admin_token
        if not token and not from_loopback(request):
            return json_error(
                403,
                "The proxy's admin pages answer clients on this machine only; to open them to "
                "others, start the proxy with --admin-token (PROXY_ADMIN_TOKEN) and send it as "
                "Authorization: Bearer <token>.",
                "invalid_request_error",
                "admin_token_not_configured",
            )
        if token:
            given = request.headers.get("Authorization", "")
            if not given and "token" in request.query:  # a browser opening the dashboard
                given = "Bearer " + request.query["token"]
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return json_error(
                    401,
                    "This page needs the proxy's admin token.",
                    "invalid_request_error",
                    "admin_token_required",
                )
        return await handler(st, request)

    return guarded


async def serve_image(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """GET /_proxy/images/<sha256>.<ext>: a rehosted image, immutable, never sniffed."""
    name = request.path[len("/_proxy/images/") :]
    store = st.rehoster.store if st.rehoster is not None else None
    found = None
    if isinstance(store, LocalImageStore) and NAME_RE.match(name):
        found = await store.get(name)
    if found is None:
        return json_error(404, "No such image.", "invalid_request_error", "not_found")
    data, ctype = found
    return web.Response(
        body=data,
        headers={
            "Content-Type": ctype,
            "Cache-Control": "public, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
        },
    )


DASHBOARD = (Path(__file__).parent / "dashboard.html").read_bytes()


async def dashboard(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """One self-contained page (no CDN) that refreshes itself from /_proxy/stats."""
    return web.Response(
        body=DASHBOARD,
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )


PROBE_EVERY_S = 1.0
SHARE_EVERY_S = 1.0
"""How often each of --workers N writes its counters for the others to add up."""
"""How often the store is probed (a dead Redis shows as degraded within this plus its timeout)."""


async def purge(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """POST /_proxy/purge {"namespace"?, "tenant"?, "model"?, "route"?}: {"purged": N}.
    Behind the admin door (the token, or loopback without one)."""
    from proxy.errors import BadFilter
    from proxy.purge import patterns_of

    body = await request.read()
    try:
        patterns = patterns_of(orjson.loads(body) if body else {})
    except (BadFilter, orjson.JSONDecodeError) as exc:
        return json_error(400, str(exc), "invalid_request_error", "invalid_purge_filter")
    try:
        purged = await st.cache.purge(*patterns)
    except StoreUnavailable as exc:
        return json_error(503, f"The store is unavailable: {exc}", "proxy_error", "store_down")
    log.info("cache.purged", purged=purged)
    return _json({"purged": purged})


def shown_url(url: str) -> str:
    """A URL as health, logs and the start-up line show it: no user, password or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    if not netloc and not parts.path:
        return f"{parts.scheme}://"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def health(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """200 while the proxy serves (degraded: passing through); ?strict=1: 503 when degraded.
    Open to every client, so it shows no credential, no setting beyond the upstream's
    address, and nothing of any tenant."""
    body: dict[str, Any] = {
        "status": "ok" if st.cache.healthy else "degraded",
        "store": {
            "backend": st.cache.store.name,
            "state": st.cache.state,
            "write_errors": st.cache.write_errors,
        },
        "upstream": shown_url(st.settings.upstream),
        "version": __version__,
        "in_flight": len(st.flights),
    }
    if st.cache.reason:
        body["store"]["reason"] = st.cache.reason
    if st.cache.warnings:
        body["warnings"] = st.cache.warnings
    strict = request.query.get("strict", "") not in ("", "0", "false")
    return _json(body, 503 if strict and not st.cache.healthy else 200)


async def combined_stats(st: State) -> Stats:
    """Every worker's counters added up (files read off the loop), or this process's."""
    if st.shared is None or st.shared.folder is None:
        return st.stats
    return await asyncio.to_thread(st.shared.combined)


async def stats(st: State, request: web.BaseRequest) -> web.StreamResponse:
    snap = (await combined_stats(st)).snapshot()
    snap["store"] = {
        "backend": st.cache.store.name,
        "state": st.cache.state,
        "write_errors": st.cache.write_errors,
    }
    return _json(snap)


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


class ProxyApp:
    """The proxy as an aiohttp low-level server: one handler, no router, no middlewares.

    The proxy's own routes live under /_proxy/ and are looked up in a dict; every other path
    goes to the data path. (aiohttp's Application router and middleware chain measured at a
    quarter of a cache HIT's cost, for routing that is one prefix test here.)
    """

    def __init__(
        self,
        settings: Settings,
        state: State | None = None,
        log_sink: logmod.BufferedSink | None = None,
        shared_dir: Path | None = None,
    ) -> None:
        """`log_sink`: configure_logging's buffer, which the app then writes its request lines
        to and flushes (None: the lines go through structlog, as in tests). `shared_dir`:
        with --workers N, the supervisor's folder where the workers share their counters."""
        self.settings = settings
        self.shared_dir = shared_dir
        self.state = state or build_state(settings)
        self.state.log = logmod.RequestLog(log_sink)
        self.registry = registry_for(self.state)
        self.routes: dict[tuple[str, str], AdminHandler] = {
            ("GET", "/_proxy/health"): health,
            ("GET", "/_proxy/stats"): admin_only(stats),
            ("GET", "/_proxy/metrics"): admin_only(self.metrics),
            ("GET", "/_proxy/dashboard"): admin_only(dashboard),
            ("POST", "/_proxy/purge"): admin_only(purge),
        }
        self.secret_pending = False
        """The store could not be asked for the shared key secret yet (see agree_secret)."""
        self._stack = contextlib.AsyncExitStack()
        """What startup() started, closed by shutdown() in reverse order: every close runs
        even when an earlier one fails."""
        logmod.guard_aiohttp_logs()

    async def metrics(self, st: State, request: web.BaseRequest) -> web.StreamResponse:
        shown = await combined_stats(st)
        registry = self.registry if shown is st.stats else registry_for(st, shown)
        return web.Response(body=render(registry), headers={"Content-Type": METRICS_CONTENT_TYPE})

    def handle(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """The proxy's own routes, or the data path: its coroutine, which aiohttp awaits
        (no frame of this method stays under a long answer)."""
        path = request.path
        if path.startswith("/_proxy/"):
            return self._own_route(request, path)
        return proxy_handler(self.state, request)

    async def _own_route(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        own = self.routes.get((request.method, path))
        if own is None:
            own = self.routes.get(("GET", path.rstrip("/") + "/*"))
        if own is not None:
            return await own(self.state, request)
        if path.startswith("/_proxy/images/") and request.method in ("GET", "HEAD"):
            return await serve_image(self.state, request)
        return json_error(404, f"No proxy route {path}.", "invalid_request_error", None)

    def server(self) -> GuardedServer:
        max_size = self.state.planner.max_body

        def request_factory(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            return CallerRequest(
                message, payload, protocol, writer, task, protocol._loop, client_max_size=max_size
            )

        # Request bodies are read raw: proxy.body decodes them, capped while decoding, and
        # forwards the decoded bytes without their Content-Encoding.
        return GuardedServer(
            self.handle,
            request_factory=request_factory,
            access_log=None,
            auto_decompress=False,
            header_timeout_s=self.settings.header_timeout_s,
            keepalive_timeout=self.settings.keepalive_timeout_s,
        )

    async def startup(self) -> None:
        stack = self._stack
        st = self.state
        # Closed in reverse: the log flushes last, after every other close has logged.
        stack.callback(st.log.flush)
        stack.callback(_cancel, spawn(st.log.flush_forever(), name="log-flusher"))
        stack.push_async_callback(st.cache.aclose)
        stack.push_async_callback(_close_optional, st.rehoster)
        stack.push_async_callback(st.upstream.aclose)
        if st.semantic is not None:
            for server in st.semantic.embedder.servers.values():
                stack.push_async_callback(server.aclose)
        stack.callback(st.workers.close)
        cache = st.cache
        await cache.warm()
        await cache.probe()
        await self.agree_secret()
        log.info(
            "proxy.started",
            store=cache.store.name,
            store_state=cache.state,
            reason=cache.reason or None,
            data_dir=str(self.settings.data_dir),
            upstream=shown_url(self.settings.upstream),
        )
        stack.callback(_cancel, spawn(self._probe_forever(), name="store-probe"))
        if self.settings.workers > 1 and self.shared_dir is not None:
            st.shared = Shared(st.stats, self.shared_dir)
            stack.callback(st.shared.close)
            stack.callback(_cancel, spawn(self._share_forever(), name="stats-share"))

    async def _share_forever(self) -> None:
        """Write this worker's counters for the others (its journal has every request since;
        a worker that dies leaves both behind, and they are still counted)."""
        shared = self.state.shared
        assert shared is not None
        try:
            while True:
                data = shared.snapshot()  # on the loop: consistent with the journal
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(shared.write, data)
                await asyncio.sleep(SHARE_EVERY_S)
        finally:
            with contextlib.suppress(OSError):
                shared.write(shared.snapshot())

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            await self.state.cache.probe()
            if self.secret_pending and self.state.cache.healthy:
                try:
                    await self.agree_secret()
                except SecretMismatch as exc:  # too late to refuse: say it, keep passing
                    log.error("store.secret_mismatch", error=str(exc))
                    self.secret_pending = False
                    self.state.cache.notes.append(str(exc))

    async def agree_secret(self) -> None:
        """Take the store's key secret (or put ours there first), so every instance on one
        store makes the same keys. SecretMismatch (one line, start-up stops) when an explicit
        --secret disagrees with the store. A store that cannot be reached: this instance's
        own secret meanwhile, and the store is asked again once it answers."""
        st = self.state
        claim = getattr(st.cache.store, "claim", None)
        if claim is None:  # an in-process store: nothing is shared
            return
        explicit = bool(self.settings.secret)
        try:
            stored: bytes = await claim(SECRET_NAME, record_of(st.planner.secret, explicit))
        except StoreUnavailable as exc:
            if not self.secret_pending:
                log.warning("store.secret_unshared", store=st.cache.store.name, error=str(exc))
                st.cache.notes.append(UNSHARED)
            self.secret_pending = True
            return
        if self.secret_pending:
            st.cache.notes.remove(UNSHARED)
        self.secret_pending = False
        use = agree(st.planner.secret, explicit, stored)
        if use != st.planner.secret:
            adopt_secret(st, use)

    async def shutdown(self) -> None:
        await self._stack.aclose()


def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()


async def _close_optional(resource: Any) -> None:
    """Close an optional resource (None: nothing to close)."""
    if resource is not None:
        await resource.aclose()


@asynccontextmanager
async def running(
    app: ProxyApp,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    shutdown_timeout: float = 10,
    sock: socket.socket | None = None,
) -> AsyncIterator[str]:
    """Serve `app` on host:port (0: a free one), or on the listening `sock` it was given,
    inside the block; yields the base URL."""
    try:
        await app.startup()
    except BaseException:
        await app.shutdown()  # what startup opened before it failed
        raise
    runner = web.ServerRunner(app.server(), shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        server = site._server
        assert server is not None
        bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()
        await app.shutdown()

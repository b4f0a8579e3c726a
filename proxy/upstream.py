"""The upstream API: a lean HTTP/1.1 client (http1.py) for every method but HEAD, which goes
through one shared aiohttp ClientSession; exceptions mapped at this edge."""

from __future__ import annotations

import asyncio
import io
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from proxy.caller_keys import CALLER_HEADERS
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.http1 import Client
from proxy.http1 import Exchange as LeanExchange

LARGE_BODY = 1024 * 1024

# Never forwarded in either direction (RFC 9110 7.6.1), plus what aiohttp recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Read by the proxy, never sent upstream. Accept-Encoding is dropped so that aiohttp asks for
# the encodings it can decode itself.
# Expect is answered by the proxy itself (100 Continue), never passed on.
PROXY_REQUEST_HEADERS = (
    frozenset(
        {"cache-control", "x-cache-namespace", "idempotency-key", "accept-encoding", "expect"}
    )
    | CALLER_HEADERS
)
# Never passed back to clients, nor stored.
DROP_RESPONSE_HEADERS = HOP_BY_HOP | {"content-encoding", "set-cookie", "date", "server"}


def mapped(exc: BaseException) -> UpstreamError | None:
    """aiohttp's (and the socket's) exception as the proxy's, so the core never sees aiohttp
    types; None for any other exception (a bug, a cancellation): it goes on as it is."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout("the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamError(f"the upstream answer broke off: {exc}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamError(f"the upstream could not be reached: {exc}")
    return None


class Exchange:
    """`async with upstream.request(...) as resp`: aiohttp's request context with its
    exceptions mapped (`mapped`), on the way in and out of the block. (A class, not an
    asynccontextmanager: this is on every MISS, and the generator version cost 6 us.)"""

    __slots__ = ("_cm",)

    def __init__(self, cm: Any) -> None:
        self._cm = cm

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            resp: aiohttp.ClientResponse = await self._cm.__aenter__()
        except Exception as exc:
            up = mapped(exc)
            if up is None:
                raise
            raise up from exc
        return resp

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._cm.__aexit__(et, exc, tb)
        except Exception as failed:
            up = mapped(failed)
            if up is None:
                raise
            raise up from failed
        if exc is not None:
            up = mapped(exc)
            if up is not None:
                raise up from exc


class Upstream:
    """Sends requests to the configured base URL and streams the answers back."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        ca_file: str = "",
    ) -> None:
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        prefix = parts.path.rstrip("/")
        # A base URL given with /v1 would double it: the request path carries /v1 already.
        self.strip_v1 = prefix.endswith("/v1")
        self.prefix = prefix[:-3] if self.strip_v1 else prefix
        self.base_url = base_url
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self.ssl: ssl.SSLContext | bool = True
        if ca_file:  # a private CA, on top of the system's
            self.ssl = ssl.create_default_context()
            self.ssl.load_verify_locations(cafile=ca_file)
        self.client = Client(
            self.origin,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            ssl_context=self.ssl if isinstance(self.ssl, ssl.SSLContext) else None,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, ssl=self.ssl),
                timeout=self.timeout,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def url_for(self, path_qs: str) -> str:
        return self.origin + self.prefix + path_qs

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes
    ) -> Exchange | LeanExchange:
        """Send one request: `async with` it, the response is open inside the block. Raises
        UpstreamError (UpstreamTimeout) for the upstream's failures, in the block too."""
        if method != "HEAD":
            return self.client.request(method, self.prefix + path_qs, headers, body)
        return Exchange(
            self.session.request(
                method,
                self.url_for(path_qs),
                headers=headers,
                # Large bodies go as a stream so the loop is not held by one big write.
                data=(io.BytesIO(body) if len(body) > LARGE_BODY else body) if body else None,
                allow_redirects=False,
            )
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._session is not None:
            await self._session.close()
            # Let the connector's transports close before the loop goes (aiohttp's advice).
            await asyncio.sleep(0)


def forward_headers(headers: Mapping[str, str], *, decoded: bool = False) -> CIMultiDict[str]:
    """The client's request headers minus hop-by-hop and the proxy's own control headers;
    `decoded`: the body goes up decoded, so its Content-Encoding must not."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in PROXY_REQUEST_HEADERS:
            continue
        if decoded and low == "content-encoding":
            continue
        out.add(name, value)
    return out


def response_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Upstream response headers a client may see again (hop-by-hop and cookies dropped)."""
    return tuple(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in DROP_RESPONSE_HEADERS
    )

"""The upstream API: one lean HTTP/1.1 client (http1.py) for every method, HEAD included;
the base URL joined with each request's path (join_path); header filters both ways.

The client raises only the proxy's own UpstreamError / UpstreamTimeout (http1.py words
them), so nothing past this edge sees a socket's, TLS's or a parser's exception."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import urlsplit

from multidict import CIMultiDict

from proxy.caller_keys import CALLER_HEADERS
from proxy.http1 import Client, Exchange, Response

__all__ = ["Exchange", "Response", "Upstream", "forward_headers", "join_path"]

# Never forwarded in either direction (RFC 9110 7.6.1), plus what the client recomputes.
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
# Read by the proxy, never sent upstream. Accept-Encoding is dropped so that the client asks
# for the encodings it can decode itself.
# Expect is answered by the proxy itself (100 Continue), never passed on.
PROXY_REQUEST_HEADERS = (
    frozenset(
        {"cache-control", "x-cache-namespace", "idempotency-key", "accept-encoding", "expect"}
    )
    | CALLER_HEADERS
)
# Never passed back to clients, nor stored.
DROP_RESPONSE_HEADERS = HOP_BY_HOP | {"content-encoding", "set-cookie", "date", "server"}


@lru_cache(maxsize=64)
def _base_segments(base_path: str) -> tuple[str, ...]:
    return tuple(part for part in base_path.split("/") if part)


def join_path(base_path: str, path_qs: str) -> str:
    """The upstream path for a request: the base URL's path, then the request's path with
    whatever it begins with that the base path ends with left out, whole segments only, so
    `/v1` (or `/openai`, `/openai/v1`) is never repeated:

        join_path("/v1", "/v1/chat/completions")       == "/v1/chat/completions"
        join_path("/api/v1", "/v1/chat/completions")   == "/api/v1/chat/completions"
        join_path("/openai", "/openai/deployments/d/x?api-version=1") keeps the query
        join_path("", "/v1/models")                    == "/v1/models"

    The query string is passed on untouched."""
    base = _base_segments(base_path)
    if not base:
        return path_qs
    path, mark, query = path_qs.partition("?")
    parts = path.split("/")  # parts[0] is "" (the path begins with "/")
    for overlap in range(min(len(base), len(parts) - 1), 0, -1):
        if tuple(parts[1 : 1 + overlap]) == base[-overlap:]:
            rest = "/".join(parts[1 + overlap :])
            break
    else:
        rest = path[1:]
    joined = "/" + "/".join(base) + ("/" + rest if rest or path.endswith("/") else "")
    return joined + mark + query


class Upstream:
    """Sends requests to the configured base URL and streams the answers back."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        ca_file: str = "",
        environ: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        """The base URL's path ("/v1", "/api/v1", "/openai", ""): see join_path."""
        self.base_url = base_url
        context: ssl.SSLContext | None = None
        if ca_file:  # a private CA, on top of the system's
            context = ssl.create_default_context()
            context.load_verify_locations(cafile=ca_file)
        self.client = Client(
            self.origin,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            ssl_context=context,
            environ=environ,
        )

    def path_for(self, path_qs: str) -> str:
        """The path and query sent upstream for a request's (see join_path)."""
        base = self.base_path
        if not base:
            return path_qs
        if base == "/v1" and path_qs.startswith("/v1/"):
            return path_qs  # the usual case, without the general join
        return join_path(base, path_qs)

    def url_for(self, path_qs: str) -> str:
        return self.origin + self.path_for(path_qs)

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes
    ) -> Exchange:
        """Send one request: `async with` it, the response is open inside the block. Raises
        UpstreamError (UpstreamTimeout) for the upstream's failures, in the block too."""
        return Exchange(self.client, method, self.path_for(path_qs), headers, body)

    async def aclose(self) -> None:
        await self.client.aclose()


def forward_headers(headers: Mapping[str, str], *, decoded: bool = False) -> CIMultiDict[str]:
    """The client's request headers minus hop-by-hop and the proxy's own control headers;
    `decoded`: the body goes up decoded, so its Content-Encoding must not."""
    out: CIMultiDict[str] = CIMultiDict()
    named: frozenset[str] = frozenset()
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        named = _connection_tokens(headers)  # what it names is hop-by-hop too (RFC 9110 7.6.1)
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in PROXY_REQUEST_HEADERS or low in named:
            continue
        if decoded and low == "content-encoding":
            continue
        out.add(name, value)
    return out


def response_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Upstream response headers a client may see again: hop-by-hop ones (those the
    Connection header names included, RFC 9110 7.6.1) and cookies dropped."""
    drop = DROP_RESPONSE_HEADERS
    connection = headers.get("Connection")
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        drop = drop | _connection_tokens(headers)
    return tuple((name, value) for name, value in headers.items() if name.lower() not in drop)


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Every header name the Connection header(s) list."""
    getall = getattr(headers, "getall", None)
    values = getall("Connection", ()) if getall is not None else [headers.get("Connection", "")]
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )

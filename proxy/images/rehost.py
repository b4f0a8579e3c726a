"""Rehost the images of an image answer: fetch each URL (guarded), store it, rewrite the URL.

The SSRF guard: only hosts on the allowlist are fetched. The default host (OpenAI's image blob
host) must be reached over https at a public address, checked on the address actually used
(a resolver that drops loopback, private, link-local and reserved addresses). A host the
operator lists explicitly is trusted as listed. Always: no redirects, connect and read
timeouts, a size cap, an image/* content type and magic bytes that match it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from proxy.errors import RehostError
from proxy.images.base import ImageStore, image_name, sniff

log = structlog.get_logger()

DEFAULT_IMAGE_HOSTS = ("oaidalleapiprodscus.blob.core.windows.net",)
IMAGE_ROUTES = ("/images/generations", "/images/edits", "/images/variations")


class PublicOnlyResolver(AbstractResolver):
    """Resolves like the system, but for `strict` hosts returns public addresses only."""

    def __init__(self, strict: frozenset[str]) -> None:
        self.strict = strict
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() not in self.strict:
            return results
        public = [r for r in results if ipaddress.ip_address(r["host"]).is_global]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_hosts(value: str) -> tuple[frozenset[str], bool]:
    """(allowed hosts, strict): the operator's list is trusted as listed; the default is strict.

    An entry is `host` (its scheme's default port only) or `host:port` (that port only)."""
    hosts = frozenset(h.strip().lower() for h in value.split(",") if h.strip())
    if hosts:
        return hosts, False
    return frozenset(DEFAULT_IMAGE_HOSTS), True


def _allowed(allowed: frozenset[str], host: str, port: int | None, scheme: str) -> bool:
    """A bare host allows its scheme's default port; `host:port` allows that port."""
    default = DEFAULT_PORTS.get(scheme)
    if port is None or port == default:
        return host in allowed or f"{host}:{default}" in allowed
    return f"{host}:{port}" in allowed


class ImageRehoster:
    """Turns an image answer with URLs into one with permanent URLs on an ImageStore."""

    def __init__(
        self,
        store: ImageStore,
        *,
        allowed_hosts: str = "",
        max_bytes: int = 50 * 1024 * 1024,
        timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.allowed, strict = parse_hosts(allowed_hosts)
        self.strict = self.allowed if strict else frozenset()
        self.max_bytes = max_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=PublicOnlyResolver(self.strict)),
                timeout=self.timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def check_url(self, url: str) -> None:
        """Raise RehostError unless `url` may be fetched at all (before any connection)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https"):
            raise RehostError(f"scheme {parts.scheme!r} is not fetched")
        try:
            port = parts.port
        except ValueError:
            raise RehostError("the image URL has an invalid port") from None
        if not _allowed(self.allowed, host, port, parts.scheme):
            where = f"{host or '?'}:{port}" if port is not None else (host or "?")
            raise RehostError(
                f"host {where} is not an allowed image source: add it to "
                "--image-source-hosts (PROXY_IMAGE_SOURCE_HOSTS) to rehost and cache these answers"
            )
        if host in self.strict and parts.scheme != "https":
            raise RehostError(f"{host} must be fetched over https")

    def allows(self, url: str) -> bool:
        """Would `url` be fetched at all (host, port and scheme allowed)?"""
        try:
            self.check_url(url)
        except RehostError:
            return False
        return True

    async def fetch(self, url: str) -> tuple[bytes, str, str]:
        """(bytes, extension, content type) of one image; RehostError on any doubt."""
        self.check_url(url)
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise RehostError(f"image fetch answered {resp.status}")
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if not ctype.startswith("image/"):
                    raise RehostError(f"image fetch returned {ctype or 'no content type'}")
                if (resp.content_length or 0) > self.max_bytes:
                    raise RehostError("image larger than the size cap")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise RehostError("image larger than the size cap")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RehostError(f"image fetch failed: {type(exc).__name__}: {exc}") from exc
        kind = sniff(bytes(data[:16]))
        if kind is None or kind[1] != ctype.replace("image/jpg", "image/jpeg"):
            raise RehostError(f"bytes are not the {ctype} they claim to be")
        return bytes(data), kind[0], kind[1]

    async def rehost_one(self, url: str, request_base: str) -> str:
        data, ext, ctype = await self.fetch(url)
        name = image_name(data, ext)
        try:
            await self.store.put(name, data, ctype)
            return await self.store.url(name, request_base)
        except Exception as exc:
            raise RehostError(f"image store failed: {type(exc).__name__}: {exc}") from exc

    async def rewrite(self, body: bytes, request_base: str) -> bytes | None:
        """The answer with every `url` rehosted; the body as is if it has no URL; None if
        any image failed (the caller then passes the original on and stores nothing)."""
        doc, targets = url_items(body)
        if doc is None or not targets:
            return body
        try:
            urls = await asyncio.gather(
                *(self.rehost_one(it["url"], request_base) for it in targets)
            )
        except RehostError as exc:
            log.warning("image.rehost_failed", reason=str(exc)[:300], images=len(targets))
            return None
        for item, url in zip(targets, urls, strict=True):
            item["url"] = url
        log.info("image.rehosted", images=len(targets), store=self.store.name)
        return orjson.dumps(doc)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.store.aclose()


def url_items(body: bytes) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the parsed image answer, its items that carry a `url`); (None, []) if it is none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, []
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return None, []
    return doc, [it for it in items if isinstance(it, dict) and isinstance(it.get("url"), str)]


def rewrites(route: str) -> bool:
    """Is this a route whose answers carry image URLs?"""
    return route.endswith(IMAGE_ROUTES)


def transform_for(rehoster: ImageRehoster) -> Any:
    """The fetch Transform that rehosts images (see proxy.fetch.Transform)."""

    async def transform(body: bytes, job: Any) -> bytes | None:
        return await rehoster.rewrite(body, job.public_base)

    return transform

"""A lean HTTP/1.1 client for the upstream: keep-alive connections, httptools' parser.

Every MISS pays the upstream call, and aiohttp's ClientSession spent about 90 us of a MISS's
CPU on generic machinery (cookies, redirects, tracing, payload registry, timeouts per
request) that a proxy forwarding bytes to one origin does not use. This client does only
what the proxy needs, for one origin:

- a pool of idle keep-alive connections (the newest first; idle past KEEPALIVE_S, closed),
  each reused only when provably clean: its request was written whole before its answer
  began, its answer was read whole, and no byte came outside an exchange. A byte that
  arrives while no request waits (an extra answer in the same write, a late `408` on an idle
  connection, a body after a `204`) closes the connection unread, and just before a
  connection is reused the kernel is asked whether anything arrived on it (quiet()). An
  answer that begins before the request was written out stops the writing and ends the
  connection's reuse. (What no HTTP/1.1 client can tell apart: an extra answer the upstream
  sends at the very moment the next request crosses it on the wire. That request's own
  answer then comes one behind, and each next request written before it arrives reads it:
  under load, with answers that take seconds, that can go on until one arrives while no
  request waits, which closes the connection. Countering it would take answers that name
  their request, which HTTP/1.1 lacks; see docs/architecture.md.)
- a request written once: once any byte of it may have reached the upstream it is never
  sent again (RFC 9112 9.3.1), but for a GET on a reused connection that closed unanswered;
- the request as one write: the request line, the client's headers, Host, Content-Length,
  and Accept-Encoding for the codings it can decode (gzip, deflate, br); bodies over
  WRITE_SLICE go in slices under the transport's flow control, with the read timeout as a
  write timeout (no progress that long: UpstreamTimeout, the connection and its buffer
  dropped);
- the answer through httptools (llhttp, in C): Content-Length, chunked, or until the
  connection closes; 1xx answers skipped; an answer to HEAD ends with its head; its body
  buffered up to PAUSE_BYTES, past which reading from the upstream pauses until the reader
  catches up;
- a coded body (gzip, deflate, br) decoded as it is read, at most DECODE_PIECE bytes of
  output at a time, so a small bomb never becomes one huge piece; a coded body that ends
  before its coding does is an error (never a short answer);
- the host resolved once per DNS_TTL_S, its addresses tried with Happy Eyeballs (RFC 8305,
  aiohappyeyeballs); HTTPS_PROXY / HTTP_PROXY / NO_PROXY honoured (proxy_for);
- connect and read timeouts (UpstreamTimeout), every other failure an UpstreamError.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import select
import socket
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import aiohappyeyeballs
import httptools
import structlog
from aiohappyeyeballs import AddrInfoType as AddrInfo
from multidict import CIMultiDict

from proxy.errors import ConfigError, UpstreamError, UpstreamTimeout

try:
    import brotli
except ImportError:  # pragma: no cover - brotli is a dependency
    brotli = None

KEEPALIVE_S = 15.0
"""An idle connection older than this is closed, not reused (aiohttp's default too)."""
DNS_TTL_S = 300.0
"""How long the upstream host's addresses are reused (aiohttp's ttl_dns_cache was 300 too)."""
IDLE_MAX = 256
"""Idle connections kept at most; more are closed as they come back."""
PAUSE_BYTES = 256 * 1024
"""Answer bytes buffered before reading from the upstream pauses."""
RESUME_BYTES = 64 * 1024
WRITE_SLICE = 256 * 1024
DECODE_PIECE = 256 * 1024
"""Decoded output is handed to the reader in pieces of about this size (brotli's may reach
twice it), each made only when the reader asks for it."""
HEAD_MAX = 256 * 1024
"""Most bytes an answer's status line and headers may take (aiohttp allows 128 lines of 8 KB)."""
ACCEPT_ENCODING = "gzip, deflate, br" if brotli is not None else "gzip, deflate"
NO_BODY_STATUSES = frozenset({204, 304})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
HAPPY_EYEBALLS_S = 0.25
"""How long one address may take to connect before the next is tried too (RFC 8305)."""

log = structlog.get_logger()


def _unreachable(cause: object) -> UpstreamError:
    return UpstreamError(f"the upstream could not be reached: {cause}")


def _broke_off(cause: object) -> UpstreamError:
    return UpstreamError(f"the upstream answer broke off: {cause}")


class _Decoder:
    """A Content-Encoding undone piece by piece, each output piece at most DECODE_PIECE."""

    __slots__ = ("_br", "_coding", "_fed", "_first", "_z")

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._fed = False
        self._z: Any = None
        self._br: Any = None
        self._first = b""
        if coding == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "br":
            assert brotli is not None
            self._br = brotli.Decompressor()

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The output of `data`, a piece at a time (made as the reader takes them: a bomb is
        never inflated further than the reader reads)."""
        self._fed = self._fed or bool(data)
        try:
            if self._br is not None:
                yield from self._brotli(data)
                return
            if self._z is None:  # deflate: zlib-wrapped, or raw as some servers send it
                data = self._first + data
                if len(data) < 2:
                    self._first = data
                    return
                wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
                self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            while data:
                piece = self._z.decompress(data, DECODE_PIECE)
                if piece:
                    yield piece
                data = self._z.unconsumed_tail
        except Exception as exc:  # zlib.error, brotli.error
            raise _broke_off(f"cannot decode its {self._coding}: {exc}") from None

    def _brotli(self, data: bytes) -> Iterator[bytes]:
        # New input only once the decoder has handed out all it holds (brotli's contract).
        br = self._br
        piece = br.process(data, output_buffer_limit=DECODE_PIECE)
        idle = 0
        while True:
            if piece:
                idle = 0
                yield piece
            elif br.can_accept_more_data():
                return
            elif (idle := idle + 1) > 2:
                raise _broke_off("its br does not decode")
            piece = br.process(b"", output_buffer_limit=DECODE_PIECE)

    def rest(self) -> Iterator[bytes]:
        """What the coding still holds at the end of the body; an error if the coded stream
        did not end there (a body cut short but framed right: never a short answer)."""
        if self._br is not None:
            yield from self.pieces(b"")
            if self._fed and not self._br.is_finished():
                raise _broke_off(f"its {self._coding} stream ended early")
        elif self._z is not None:
            try:
                rest = self._z.flush()
            except zlib.error as exc:
                raise _broke_off(f"cannot decode its {self._coding}: {exc}") from None
            if rest:
                yield rest
            if self._fed and not self._z.eof:
                raise _broke_off(f"its {self._coding} stream ended early")
        elif self._first:  # one byte cannot be a deflate stream
            raise _broke_off(f"cannot decode its {self._coding}")


class Response:
    """The upstream's answer, read as it arrives (the aiohttp ClientResponse subset the proxy
    uses: status, headers, content_length, content.iter_any(), read())."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_decoder",
        "_done",
        "_error",
        "_size",
        "_until_close",
        "_waiter",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, status: int, headers: CIMultiDict[str], conn: _Connection) -> None:
        self.status = status
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        coding = headers.get("Content-Encoding", "").strip().lower()
        self._decoder = _Decoder(coding) if coding in ("gzip", "deflate", "br") else None
        self._until_close = (
            length is None
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in NO_BODY_STATUSES
        )

    @property
    def content(self) -> Response:
        """aiohttp's `resp.content.iter_any()` spelling (a property: an attribute pointing at
        itself would make every answer a reference cycle, freed only by the collector)."""
        return self

    # -- fed by the connection ------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > PAUSE_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the proxy ----------------------------------------------------------------

    async def _next(self) -> bytes | None:
        """The next raw piece of the body, or None at its end."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return None
            conn = self._conn
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            timer = conn.read_timer(waiter) if conn is not None else None
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                    if conn is not None:
                        conn._timed = None
        data = self._chunks.popleft()
        self._size -= len(data)
        conn = self._conn
        if conn is not None and conn.paused and self._size <= RESUME_BYTES:
            conn.resume()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        decoder = self._decoder
        while True:
            data = await self._next()
            if data is None:
                break
            if decoder is None:
                yield data
            else:
                for piece in decoder.pieces(data):
                    yield piece
        if decoder is not None:
            for piece in decoder.rest():
                yield piece

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_any()])


class _Unsolicited(Exception):
    """A byte of an answer nobody asked for (raised inside the parser to stop it)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the upstream, one request at a time.

    Its state, as far as reuse goes: `active` from the moment a request is written until its
    answer ended (or broke off); any byte that arrives while it is not active is an answer
    nobody asked for, and closes the connection unread. `written`: every byte of the request
    was handed to the transport; an answer whose head comes before that (or while the
    transport still buffers part of the request) makes the connection `early`: the rest of
    the body is not written and the connection is never reused."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True
        self.paused = False
        self.idle_since = 0.0
        self.got_bytes = False
        self.keep = False
        self.active = False
        self.written = False
        self.early = False
        self.no_body = False
        """The request was HEAD: its answer ends with its head."""
        self._complete = False
        self._poll: select.poll | None = None
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._informational = False
        self._head: asyncio.Future[Response] | None = None
        self.resp: Response | None = None
        self._drain: asyncio.Future[None] | None = None
        self._timed: asyncio.Future[Any] | None = None
        """What the read timer is for (see read_timer)."""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)

    def _watch(self) -> None:
        """A poll object on the socket (once), for quiet()."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # nobody asked: never parsed, never reaches a request
            self._drop("an answer came that no request asked for")
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lost(_broke_off("it asked to upgrade the connection"))
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Unsolicited):
                self._drop("more came after the answer")
            else:
                self._lost(_broke_off(f"malformed HTTP: {exc}"))
            return
        except httptools.HttpParserError as exc:
            self._lost(_broke_off(f"malformed HTTP: {exc}"))
            return
        if self._complete:
            self._complete = False
            if self.paused:
                self.resume()
            self.client._release(self)
        elif self._head is not None:  # still no head: what it holds so far stays bounded
            self._head_size += len(data)
            if self._head_size > HEAD_MAX:
                self._lost(_broke_off("its headers are larger than 256 KB"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost ends what is in progress

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.client._busy.discard(self)
        resp = self.resp
        if resp is not None and resp._until_close and exc is None:
            self.resp = None  # an answer without a length ends where its connection does
            resp._conn = None
            resp._finish()
        if self._head is not None:  # (worded as aiohttp words it)
            self._lost(_unreachable("Server disconnected"))
        elif self.resp is not None:
            self._lost(_broke_off(exc or "the connection closed before the answer ended"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # the writer sees the connection is gone

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.active:  # a second answer in the bytes of the first
            raise _Unsolicited

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            return  # a chunked body's trailer: not passed on (aiohttp dropped them too)
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._informational = True
            return
        transport = self.transport
        if not self.written or (transport is not None and transport.get_write_buffer_size()):
            self.early = True  # answered before it had the whole request: never reused
        resp = Response(status, CIMultiDict(headers), self)
        head = self._head
        self._head = None
        if self.no_body:  # HEAD: the headers describe a body that is not sent
            resp._conn = None
            resp._until_close = False
            resp._finish()
            self.keep = False
            self.active = False
            self._complete = True
        else:
            self.resp = resp
        if head is not None and not head.done():
            head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self.active:
            return  # (HEAD: already ended with its head)
        resp = self.resp
        self.resp = None
        self.active = False
        self.keep = self.parser.should_keep_alive() and not self.early
        self._complete = True  # released once the parser has gone through the rest
        if resp is not None:
            resp._conn = None
            resp._finish()

    # -- used by the client and the response ------------------------------------------------

    def _drop(self, why: str) -> None:
        """Close a connection that got bytes outside an exchange, without reading them."""
        self.alive = False
        self.active = False
        self._complete = False
        log.info("upstream.unsolicited", reason=why)
        if self.transport is not None:
            self.transport.abort()

    def _lost(self, exc: BaseException) -> None:
        """End whatever is in progress with `exc` and close the connection (at once: what it
        still buffers of a request is dropped)."""
        self.alive = False
        self.active = False
        head = self._head
        if head is not None:
            self._head = None
            if not head.done():
                head.set_exception(exc)
        resp = self.resp
        if resp is not None:
            self.resp = None
            resp._conn = None
            resp._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def quiet(self) -> bool:
        """Nothing arrived on the idle connection, not even its end: the kernel is asked
        (select, no read), so bytes the loop has not handed over yet count too."""
        transport = self.transport
        if transport is None or transport.is_closing() or not self.alive:
            return False
        if self._poll is None:
            self._watch()
            if self._poll is None:
                return True
        try:
            return not self._poll.poll(0)  # (a closed descriptor: POLLNVAL, not quiet)
        except OSError:
            return False

    def read_timer(self, waiter: asyncio.Future[Any]) -> asyncio.TimerHandle | None:
        """A timer that ends the exchange if `waiter` is not done within the read timeout.
        The timer holds the connection, not the waiter: asyncio keeps a cancelled timer
        (and its arguments) until its time would have come, and a waiter's result is the
        answer."""
        timeout = self.client.read_timeout_s
        if not timeout:
            return None
        self._timed = waiter
        return asyncio.get_running_loop().call_later(timeout, self._expire)

    def _expire(self) -> None:
        waiter, self._timed = self._timed, None
        if waiter is not None and not waiter.done():
            self._lost(UpstreamTimeout("the upstream did not answer in time"))

    async def send(self, head: bytes, body: bytes, *, no_body: bool = False) -> Response:
        """Write one request and wait for the head of its answer. Writing the body has the
        read timeout too: a stretch that long without progress ends the exchange."""
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        self.got_bytes = False
        self.keep = False
        self.early = False
        self.written = False
        self.no_body = no_body
        self._complete = False
        self._head_size = 0
        fut: asyncio.Future[Response] = loop.create_future()
        self._head = fut
        self.active = True
        if len(body) <= WRITE_SLICE:
            transport.write(head + body if body else head)
            self.written = True
        else:
            transport.write(head)
            view = memoryview(body)
            for start in range(0, len(body), WRITE_SLICE):
                drain = self._drain
                if drain is not None and not drain.done():
                    timer = self.read_timer(drain)
                    try:
                        await drain
                    finally:
                        if timer is not None:
                            timer.cancel()
                            self._timed = None
                if not self.alive or self._head is not fut or fut.done():
                    break  # broke off, or answered early: the rest is not sent
                transport.write(view[start : start + WRITE_SLICE])
            else:
                self.written = True
        timer = self.read_timer(fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
                self._timed = None


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT: its head, read before TLS starts over the tunnel."""

    def __init__(self) -> None:
        self.data = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data or len(self.data) > HEAD_MAX:
            if not self.done.done():
                self.done.set_result(self.data)
            if self.transport is not None:
                self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.data)


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str]) -> str | None:
    """The egress proxy URL for the upstream, from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (the
    lower-case spelling first, as curl and the SDKs read them), or None: no proxy set, or
    NO_PROXY names the host (`*`, a name and its subdomains, an address or a CIDR range,
    each with an optional `:port`)."""

    def env(name: str) -> str:
        return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()

    url = env(f"{scheme}_proxy") or env("all_proxy")
    if not url:
        return None
    host = host.strip("[]").lower()
    for entry in env("no_proxy").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        name, _, only_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if only_port and only_port != str(port):
            continue
        name = name.strip("[]")
        if "/" in name:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                    return None
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return None
    return url if "://" in url else "http://" + url


class Client:
    """Requests to one origin (`http://host:port` or `https://...`) over pooled connections,
    through the egress proxy that HTTPS_PROXY / HTTP_PROXY / NO_PROXY name, if any (a CONNECT
    tunnel for https, an absolute-form request target for http)."""

    def __init__(
        self,
        origin: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        ssl_context: ssl.SSLContext | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(origin)
        self.tls = parts.scheme == "https"
        default = 443 if self.tls else 80
        host = parts.hostname or ""
        port = parts.port or default
        self.host, self.port = host, port
        named = f"[{host}]" if ":" in host else host
        self.host_header = named if port == default else f"{named}:{port}"
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ssl: ssl.SSLContext | None = (
            (ssl_context or ssl.create_default_context()) if self.tls else None
        )
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self.closed = False
        self.proxy: SplitResult | None = None
        """The egress proxy (http://[user:password@]host:port), if one is used."""
        self.target_prefix = ""
        """Put before each request's path: the absolute form, through an http proxy."""
        self._proxy_auth = ""
        via = proxy_for(parts.scheme, host, port, os.environ if environ is None else environ)
        if via is not None:
            self.proxy = urlsplit(via)
            if self.proxy.scheme != "http" or not self.proxy.hostname:
                shown = f"{self.proxy.scheme}://{self.proxy.hostname}:{self.proxy.port or ''}"
                raise ConfigError(
                    f"HTTPS_PROXY / HTTP_PROXY / ALL_PROXY: the egress proxy must be "
                    f"http://host:port, not {shown}"
                )
            if self.proxy.username is not None:
                user = unquote(self.proxy.username)
                secret = unquote(self.proxy.password or "")
                token = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
                self._proxy_auth = f"Proxy-Authorization: Basic {token}\r\n"
            if not self.tls:
                self.target_prefix = f"http://{self.host_header}"
        self._dns: dict[tuple[str, int], tuple[list[AddrInfo], float]] = {}
        self._resolving: dict[tuple[str, int], asyncio.Future[list[AddrInfo]]] = {}

    def request(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes
    ) -> Exchange:
        return Exchange(self, method, path_qs, headers, body)

    def head_bytes(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes
    ) -> bytes:
        lines = [f"{method} {self.target_prefix}{path_qs} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        accept = True
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
            if accept and name.lower() == "accept":
                accept = False
        if accept:
            lines.append("Accept: */*\r\n")
        if self._proxy_auth and not self.tls:
            lines.append(self._proxy_auth)
        lines.append(f"Accept-Encoding: {ACCEPT_ENCODING}\r\nContent-Length: {len(body)}\r\n\r\n")
        text = "".join(lines)
        # One request line, one line per header: a CR or LF inside any of them would smuggle
        # another (the server side refuses them in what clients send; this is the backstop).
        if text.count("\n") != len(lines) + 3 or text.count("\r") != len(lines) + 3:
            raise UpstreamError("the request could not be sent: a header holds a line break")
        return text.encode("utf-8", "surrogateescape")

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        host, port = (
            (self.host, self.port) if proxy is None else (proxy.hostname or "", proxy.port or 80)
        )
        try:
            async with asyncio.timeout(self.connect_timeout_s or None):
                infos = await self._addresses(host, port)
                try:  # Happy Eyeballs (RFC 8305): an IPv6 address that does not route waits
                    sock = await aiohappyeyeballs.start_connection(  # 250 ms, not a timeout
                        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_S
                    )
                except OSError:
                    self._dns.pop((host, port), None)  # resolve again: the addresses may move
                    raise
                if proxy is not None and self.tls:
                    return await self._tunnel(sock)
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    sock=sock,
                    ssl=self.ssl,
                    server_hostname=self.host if self.tls else None,
                )
                return conn
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except (OSError, ssl.SSLError) as exc:
            raise _unreachable(exc) from None

    async def _tunnel(self, sock: socket.socket) -> _Connection:
        """CONNECT through the egress proxy, then TLS with the upstream inside the tunnel."""
        loop = asyncio.get_running_loop()
        raw, tunnel = await loop.create_connection(_Tunnel, sock=sock)
        try:
            authority = (
                f"[{self.host}]:{self.port}" if ":" in self.host else (f"{self.host}:{self.port}")
            )
            raw.write(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                f"{self._proxy_auth}\r\n".encode()
            )
            answer = await tunnel.done
            line = answer.split(b"\r\n", 1)[0]
            parts = line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or parts[1] != b"200":
                shown = line[:100].decode("latin-1") or "it closed the connection"
                raise OSError(f"the egress proxy refused the tunnel: {shown}")
            if not answer.endswith(b"\r\n\r\n"):
                raise OSError("the egress proxy sent bytes after its answer to CONNECT")
            conn = _Connection(self)
            assert self.ssl is not None
            conn.transport = await loop.start_tls(raw, conn, self.ssl, server_hostname=self.host)
            return conn
        except BaseException:
            raw.abort()
            raise

    async def _addresses(self, host: str, port: int) -> list[AddrInfo]:
        """The host's addresses, resolved once per DNS_TTL_S (a burst of new connections
        shares one lookup); an IP address as it is."""
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(address), port))]
        now = time.monotonic()
        known = self._dns.get((host, port))
        if known is not None and now < known[1]:
            return known[0]
        resolving = self._resolving.get((host, port))
        if resolving is None:
            resolving = self._resolving[host, port] = asyncio.ensure_future(
                self._resolve(host, port)
            )
        try:
            infos: list[AddrInfo] = list(await asyncio.shield(resolving))
        finally:
            if resolving.done():
                self._resolving.pop((host, port), None)
        if not infos:
            raise OSError(f"{host} has no address")
        self._dns[host, port] = (infos, now + DNS_TTL_S)
        return infos

    async def _resolve(self, host: str, port: int) -> list[AddrInfo]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(info[0], info[1], info[2], info[3], info[4]) for info in infos]

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < KEEPALIVE_S and conn.quiet():
                return conn
            conn.alive = False
            if conn.transport is not None:
                conn.transport.abort()
        return None

    async def send(self, method: str, head: bytes, body: bytes) -> tuple[_Connection, Response]:
        """Send one request (`head` and `body`) and wait for the head of its answer.

        A reused connection is checked just before the request is written (quiet()); once
        any byte of a request was written it is never sent again, whatever happens (RFC
        9112 9.3.1: the upstream may have acted on it; one more chat completion is one more
        bill), but for GET, which is idempotent, on a reused connection that closed without
        answering a byte."""
        if self.closed:
            raise _unreachable("the proxy is shutting down")
        no_body = method == "HEAD"
        conn = self._idle_connection()
        if conn is not None:
            try:
                return conn, await self._send_on(conn, head, body, no_body)
            except UpstreamTimeout:
                raise
            except UpstreamError:
                if conn.got_bytes or method not in IDEMPOTENT:
                    raise
                # GET on a connection that closed while idle, unanswered: once more, afresh.
        conn = await self._connect()
        return conn, await self._send_on(conn, head, body, no_body)

    async def _send_on(
        self, conn: _Connection, head: bytes, body: bytes, no_body: bool
    ) -> Response:
        self._busy.add(conn)
        try:
            return await conn.send(head, body, no_body=no_body)
        except BaseException:
            self._busy.discard(conn)
            if conn.alive:  # cancelled while waiting: nobody will read this answer
                conn._lost(_broke_off("the request was abandoned"))
            raise

    def _release(self, conn: _Connection) -> None:
        """An answer arrived whole and nothing came after it: the connection may serve the
        next request (if it was clean: written whole before its answer came, keep-alive)."""
        self._busy.discard(conn)
        if (
            not conn.keep
            or conn.early
            or not conn.alive
            or self.closed
            or len(self._idle) >= IDLE_MAX
        ):
            conn.alive = False
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        """Close a connection whose answer was not read to the end."""
        self._busy.discard(conn)
        if conn.resp is not None or conn._head is not None:
            conn._lost(_broke_off("the reader left"))
        elif conn.transport is not None and conn not in self._idle:
            conn.alive = False
            conn.transport.abort()

    async def aclose(self) -> None:
        self.closed = True
        for conn in [*self._idle, *self._busy]:
            conn.alive = False
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._busy.clear()


@dataclass(slots=True)
class Exchange:
    """`async with Exchange(client, ...) as resp`: the answer is open inside the block; leaving
    it before the answer was read whole closes its connection. (A dataclass: its generated
    __init__ is the caller's only step into this module before the block.)"""

    client: Client
    method: str
    path_qs: str
    headers: Mapping[str, str]
    body: bytes
    _conn: _Connection | None = None
    _resp: Response | None = None

    async def __aenter__(self) -> Response:
        client, method, body = self.client, self.method, self.body
        head = client.head_bytes(method, self.path_qs, self.headers, body)
        self._conn, self._resp = await client.send(method, head, body)
        return self._resp

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        resp, conn = self._resp, self._conn
        if conn is not None and resp is not None and not resp._done:
            self.client.discard(conn)

"""The lean upstream client (proxy/http1.py) against a scripted raw HTTP server: framing,
keep-alive and its retry, codings, timeouts, back-pressure and what breaks."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import zlib
from collections.abc import Awaitable, Callable

import brotli
import pytest
from aiohappyeyeballs import AddrInfoType
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import http1
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.http1 import DECODE_PIECE, PAUSE_BYTES, Client

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]
"""Writes the answer to one request (its head and body given); False closes the connection."""


class Server:
    """A raw HTTP/1.1 server whose every answer is scripted; counts connections and keeps
    every request as it arrived."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.closed = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.answer(reader, writer, head + body):
                    break
        finally:
            writer.close()
            self.closed.set()

    def client(self, **kw: float) -> Client:
        return Client(
            f"http://127.0.0.1:{self.port}",
            connect_timeout_s=kw.get("connect", 5.0),
            read_timeout_s=kw.get("read", 5.0),
            ssl_context=None,
        )


def fixed(raw: bytes, keep: bool = True) -> Answer:
    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(raw)
        await w.drain()
        return keep

    return answer


def ok(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def ask(client: Client, body: bytes = b"{}", **headers: str) -> tuple[int, bytes]:
    async with client.request("POST", "/v1/chat/completions", CIMultiDict(headers), body) as r:
        return r.status, await r.read()


async def test_keep_alive_one_connection_and_the_request_as_sent() -> None:
    """Several requests share one keep-alive connection and each goes out with its request line,
    headers and body as expected."""
    async with Server(fixed(ok(b'{"a":1}', "Content-Type: application/json"))) as srv:
        client = srv.client()
        for _ in range(3):
            assert await ask(client, b'{"q":1}', Authorization="Bearer k") == (200, b'{"a":1}')
        await client.aclose()
    assert srv.connections == 1 and len(srv.requests) == 3
    head, _, body = srv.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
    assert b"Authorization: Bearer k" in lines and b"Content-Length: 7" in lines
    assert b"Accept-Encoding: gzip, deflate, br" in lines and body == b'{"q":1}'


async def test_a_chunked_answer_streams_as_it_comes() -> None:
    """A chunked answer reaches the reader piece by piece as it comes, and the connection is reused
    after it."""
    gate = asyncio.Event()

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await gate.wait()
        w.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    async with Server(answer) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            pieces = resp.content.iter_any()
            assert await anext(pieces) == b"first"  # before the rest was even written
            gate.set()
            assert b"".join([p async for p in pieces]) == b"second"
        assert await ask(client) == (200, b"firstsecond")  # the same connection again
        await client.aclose()
    assert srv.connections == 1


async def test_an_answer_without_length_ends_with_its_connection() -> None:
    """An answer without a length is read until its connection closes, and the next request opens a
    new one."""
    async with Server(fixed(b"HTTP/1.1 200 OK\r\n\r\nuntil close", keep=False)) as srv:
        client = srv.client()
        assert await ask(client) == (200, b"until close")
        assert await ask(client) == (200, b"until close")
        await client.aclose()
    assert srv.connections == 2


async def test_informational_answers_are_skipped() -> None:
    """1xx informational answers before the real one are skipped, headers and all."""
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"x")
    async with Server(fixed(raw)) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            assert resp.status == 200 and "Link" not in resp.headers
            assert await resp.read() == b"x"
        await client.aclose()


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
        ("br", brotli.compress),
    ],
)
async def test_coded_answers_are_decoded(coding: str, pack: Callable[[bytes], bytes]) -> None:
    """gzip, deflate (zlib or raw) and brotli answers are decoded while their Content-Encoding
    header is kept."""
    body = b'{"answer": "' + b"word " * 5000 + b'"}'
    raw = ok(pack(body), f"Content-Encoding: {coding}")
    async with Server(fixed(raw)) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            assert resp.headers["Content-Encoding"] == coding
            assert await resp.read() == body
        await client.aclose()


@pytest.mark.parametrize("coding", ["gzip", "br"])
async def test_a_compression_bomb_comes_out_in_bounded_pieces(coding: str) -> None:
    """A compression bomb is decoded whole but never in a piece larger than twice DECODE_PIECE."""
    zeros = b"\0" * (64 * 1024 * 1024)
    packed = gzip.compress(zeros, 9) if coding == "gzip" else brotli.compress(zeros)
    async with Server(fixed(ok(packed, f"Content-Encoding: {coding}"))) as srv:
        client = srv.client()
        total = biggest = 0
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            async for piece in resp.content.iter_any():
                total += len(piece)
                biggest = max(biggest, len(piece))
        await client.aclose()
    assert total == len(zeros) and biggest <= 2 * DECODE_PIECE


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused() -> None:
    """A kept-alive connection the upstream closed while idle is not reused for the next request."""

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(ok(b"x"))  # says keep-alive, then closes
        await w.drain()
        return False

    async with Server(answer) as srv:
        client = srv.client()
        assert await ask(client) == (200, b"x")
        await srv.closed.wait()
        await asyncio.sleep(0.05)
        assert await ask(client) == (200, b"x")
        await client.aclose()
    assert srv.connections == 2 and len(srv.requests) == 2


def _closes_the_second_unanswered() -> Answer:
    served = 0

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        nonlocal served
        served += 1
        if served == 2:
            return False  # read the second request, closed without a byte
        w.write(ok(b"x"))
        await w.drain()
        return True

    return answer


async def test_a_post_the_upstream_read_is_never_sent_again() -> None:
    """A reused connection closed after the upstream read a POST: an error, not a resend
    (RFC 9112 9.3.1: it may have been acted on; one more chat completion is one more bill)."""
    async with Server(_closes_the_second_unanswered()) as srv:
        client = srv.client()
        assert await ask(client) == (200, b"x")
        with pytest.raises(UpstreamError, match="Server disconnected"):
            await ask(client)
        await client.aclose()
    assert srv.connections == 1 and len(srv.requests) == 2


async def test_a_get_on_a_reused_connection_closed_unanswered_is_retried_once() -> None:
    """The race an idle timeout makes, for an idempotent GET: once more on a new connection."""
    async with Server(_closes_the_second_unanswered()) as srv:
        client = srv.client()
        for _ in range(2):
            async with client.request("GET", "/v1/models", CIMultiDict(), b"") as resp:
                assert (resp.status, await resp.read()) == (200, b"x")
        await client.aclose()
    assert srv.connections == 2 and len(srv.requests) == 3


async def test_no_retry_once_the_upstream_began_to_answer() -> None:
    """A reused connection that broke off after the first bytes of an answer: the upstream
    had the request, so it is not sent again."""
    served = 0

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        nonlocal served
        served += 1
        w.write(ok(b"x") if served == 1 else b"HTTP/1.1 200 OK\r\nContent-Le")
        await w.drain()
        return served == 1

    async with Server(answer) as srv:
        client = srv.client()
        assert await ask(client) == (200, b"x")
        with pytest.raises(UpstreamError, match="Server disconnected"):
            await ask(client)
        await client.aclose()
    assert srv.connections == 1 and len(srv.requests) == 2


@pytest.mark.parametrize("raw", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"])
async def test_a_fresh_connection_closed_before_a_whole_head_is_an_error(raw: bytes) -> None:
    """A fresh connection that closes before a whole answer head is an UpstreamError, sent once."""
    async with Server(fixed(raw, keep=False)) as srv:
        client = srv.client()
        with pytest.raises(UpstreamError, match="could not be reached: Server disconnected"):
            await ask(client)
        await client.aclose()
    assert len(srv.requests) == 1


async def test_a_body_cut_short_is_an_error() -> None:
    """A body shorter than its Content-Length is an UpstreamError saying it broke off."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
    async with Server(fixed(raw, keep=False)) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            with pytest.raises(UpstreamError, match="broke off"):
                await resp.read()
        await client.aclose()


async def test_a_silent_upstream_times_out_before_and_within_the_answer() -> None:
    """An upstream that goes silent before the head or in the middle of the body times out with
    UpstreamTimeout."""

    async def silent(r: asyncio.StreamReader, _w: asyncio.StreamWriter, _req: bytes) -> bool:
        await r.read()  # until the client gives up
        return False

    async with Server(silent) as srv:
        client = srv.client(read=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            await ask(client)
        assert loop.time() - t0 < 2
        await client.aclose()

    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await w.drain()
        await r.read()
        return False

    async with Server(stalls) as srv:
        client = srv.client(read=0.2)
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            with pytest.raises(UpstreamTimeout):
                await resp.read()
        await client.aclose()


async def test_nothing_listening_and_malformed_answers_are_upstream_errors() -> None:
    """A port with nothing listening and an answer that is not HTTP are both UpstreamErrors."""
    async with Server(fixed(b"")) as srv:
        port = srv.port
    client = Client(
        f"http://127.0.0.1:{port}", connect_timeout_s=2, read_timeout_s=2, ssl_context=None
    )
    with pytest.raises(UpstreamError, match="could not be reached"):
        await ask(client)
    await client.aclose()
    async with Server(fixed(b"NOT HTTP AT ALL\r\n\r\n", keep=False)) as srv:
        client = srv.client()
        with pytest.raises(UpstreamError, match="malformed"):
            await ask(client)
        await client.aclose()


async def test_endless_headers_are_cut_off() -> None:
    """An answer head larger than 256 KB is cut off with an UpstreamError."""

    async def endless(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\n")
        try:
            for i in range(100_000):
                w.write(b"X-Filler-%d: %s\r\n" % (i, b"v" * 100))
                await w.drain()
        except ConnectionError:
            pass
        return False

    async with Server(endless) as srv:
        client = srv.client()
        with pytest.raises(UpstreamError, match="larger than 256 KB"):
            await ask(client)
        await client.aclose()


async def test_a_reader_that_waits_pauses_the_upstream() -> None:
    """A reader that stops reading makes the client stop reading the socket, with bounded buffering
    and nothing lost."""
    big = bytes(range(256)) * (16 * 1024)  # 4 MB

    async with Server(fixed(ok(big))) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            await asyncio.sleep(0.3)  # reads nothing: the client stops reading the socket
            assert resp._size <= PAUSE_BYTES + 256 * 1024
            assert await resp.read() == big
        assert await ask(client) == (200, big)
        await client.aclose()
    assert srv.connections == 1


async def test_leaving_before_the_end_closes_the_connection() -> None:
    """Leaving an answer before its end closes its connection; the next request opens one."""
    async with Server(fixed(ok(b"y" * 2_000_000))) as srv:
        client = srv.client()
        async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
            await anext(resp.content.iter_any())
        assert (await ask(client))[0] == 200
        await client.aclose()
    assert srv.connections == 2


async def test_a_large_request_body_arrives_whole() -> None:
    """A request body of several megabytes, sent in slices, arrives whole."""
    body = bytes(range(256)) * (12 * 1024)  # 3 MB, sent in slices
    async with Server(fixed(ok(b"ok"))) as srv:
        client = srv.client()
        assert await ask(client, body) == (200, b"ok")
        await client.aclose()
    assert srv.requests[0].endswith(body)


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    """A header value with a line break is refused before any byte is sent upstream."""
    async with Server(fixed(ok(b"x"))) as srv:
        client = srv.client()
        with pytest.raises(UpstreamError, match="line break"):
            await ask(client, b"{}", **{"X-Evil": "a\r\nX-Injected: 1"})
        await client.aclose()
    assert srv.requests == []


class _Transport:
    """Enough of a transport for feeding a connection by hand."""

    def __init__(self) -> None:
        self.closed = False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


async def _parse(pieces: list[bytes]) -> tuple[int, bytes]:
    client = Client("http://127.0.0.1:1", connect_timeout_s=1, read_timeout_s=1, ssl_context=None)
    conn = http1._Connection(client)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn._head = asyncio.get_running_loop().create_future()
    conn.active = conn.written = True
    head = conn._head
    for piece in pieces:
        conn.data_received(piece)
    resp = await head
    return resp.status, await resp.read()


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=3000),
    chunk=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_any_split_of_a_chunked_answer_gives_the_same_body(
    body: bytes, chunk: int, cuts: list[int]
) -> None:
    """A chunked answer parses to the same status and body however its bytes are split."""
    raw = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i in range(0, len(body), chunk):
        part = body[i : i + chunk]
        raw += b"%x\r\n%s\r\n" % (len(part), part)
    raw += b"0\r\n\r\n"
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in itertools.pairwise(points) if b > a]
    assert asyncio.run(_parse(pieces)) == (201, body)


async def test_a_host_name_is_resolved_once_and_its_addresses_tried_in_turn() -> None:
    """localhost may resolve to ::1 first while the server listens on 127.0.0.1 only."""
    async with Server(fixed(ok(b"x"), keep=False)) as srv:
        client = Client(
            f"http://localhost:{srv.port}", connect_timeout_s=5, read_timeout_s=5, ssl_context=None
        )
        assert client.host_header == f"localhost:{srv.port}"
        assert await ask(client) == (200, b"x")
        resolved = client._dns[("localhost", srv.port)][0]
        assert "127.0.0.1" in [info[4][0] for info in resolved]
        assert await ask(client) == (200, b"x")
        assert client._dns[("localhost", srv.port)][0] is resolved and not client._resolving
        await client.aclose()
    assert srv.connections == 2
    assert f"Host: localhost:{srv.port}".encode() in srv.requests[0]


async def test_trailers_are_dropped_and_never_become_the_next_answers_headers() -> None:
    """Chunked trailers are dropped and never leak into the next answer on the same connection."""
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trail\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Trail: t\r\n\r\n"
    )
    async with Server(fixed(raw)) as srv:
        client = srv.client()
        for _ in range(2):
            async with client.request("POST", "/x", CIMultiDict(), b"") as resp:
                assert await resp.read() == b"hi"
                assert "X-Trail" not in resp.headers and resp.headers["Trailer"] == "X-Trail"
        await client.aclose()
    assert srv.connections == 1


async def test_an_answer_is_freed_without_the_garbage_collector() -> None:
    """No reference cycle through a read answer: its buffers go as soon as it is dropped."""
    import gc

    async with Server(fixed(ok(b"x" * 1000))) as srv:
        client = srv.client()
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                assert await ask(client) == (200, b"x" * 1000)
            await asyncio.sleep(0)  # (the step that read the last one holds it until now)
            left = [o for o in gc.get_objects() if type(o) is http1.Response]
        finally:
            gc.enable()
        await client.aclose()
    assert left == []


@pytest.mark.parametrize(
    ("environ", "host", "expected"),
    [
        ({}, "api.openai.com", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "api.openai.com", "http://p:3128"),
        ({"https_proxy": "p:3128", "HTTPS_PROXY": "http://q:1"}, "api.openai.com", "http://p:3128"),
        ({"ALL_PROXY": "http://p:1"}, "api.openai.com", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "api.openai.com", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "openai.com"}, "api.openai.com", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".openai.com"}, "api.openai.com", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "penai.com"}, "api.openai.com", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "10.0.0.0/8"}, "10.1.2.3", None),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.openai.com:8443"},
            "api.openai.com",
            "http://p:1",
        ),
        ({"HTTP_PROXY": "http://p:1"}, "api.openai.com", None),  # https upstream: not HTTP_PROXY
    ],
)
def test_the_egress_proxy_from_the_environment(
    environ: dict[str, str], host: str, expected: str | None
) -> None:
    """HTTPS_PROXY / ALL_PROXY (lower case first) unless NO_PROXY names the host, as curl and
    the SDKs read them."""
    assert http1.proxy_for("https", host, 443, environ) == expected


async def test_through_an_http_proxy_the_target_is_absolute_and_authenticated() -> None:
    """HTTP_PROXY for an http upstream: the request goes to the proxy, its target in absolute
    form, with the proxy's credentials as Proxy-Authorization (never the upstream's)."""
    async with Server(fixed(ok(b"via"))) as proxy_srv:
        client = Client(
            "http://upstream.internal:8000",
            connect_timeout_s=5,
            read_timeout_s=5,
            ssl_context=None,
            environ={"HTTP_PROXY": f"http://user:pa%40ss@127.0.0.1:{proxy_srv.port}"},
        )
        assert await ask(client) == (200, b"via")
        await client.aclose()
    sent = proxy_srv.requests[0]
    assert sent.startswith(b"POST http://upstream.internal:8000/v1/chat/completions HTTP/1.1\r\n")
    assert b"Host: upstream.internal:8000\r\n" in sent
    assert b"Proxy-Authorization: Basic dXNlcjpwYUBzcw==\r\n" in sent  # user:pa@ss


def echo_then(stray: bytes) -> Answer:
    """Answers with the request's last three bytes, then 50 ms later sends `stray` while the
    connection idles."""

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, req: bytes) -> bool:
        w.write(ok(req[-3:]))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(stray)
        await w.drain()
        return True

    return answer


async def test_an_answer_nobody_asked_for_closes_the_idle_connection() -> None:
    """Bytes that arrive while the connection idles (a late 408) close it: the next request
    goes on a new connection and gets its own answer, never the stray one."""
    late_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    async with Server(echo_then(late_408)) as srv:
        client = srv.client()
        assert await ask(client, b"one") == (200, b"one")
        await asyncio.sleep(0.2)
        assert await ask(client, b"two") == (200, b"two")
        await client.aclose()
    assert srv.connections == 2


async def test_bytes_the_loop_has_not_read_yet_keep_an_idle_connection_from_reuse() -> None:
    """Stray bytes still in the kernel's buffer (the loop has not handed them over) are seen
    just before reuse (quiet()): the next request goes on a new connection."""
    async with Server(echo_then(ok(b"stray"))) as srv:
        client = srv.client(read=2.0)
        assert await ask(client, b"one") == (200, b"one")
        idle = client._idle[-1]
        assert idle.transport is not None
        idle.transport.pause_reading()  # the stray answer stays in the kernel, unread
        await asyncio.sleep(0.2)
        assert not idle.quiet()
        assert await ask(client, b"two") == (200, b"two")
        await client.aclose()
    assert srv.connections == 2


async def test_a_second_answer_in_the_same_write_is_never_the_next_answer() -> None:
    """An extra whole answer in the bytes of the first: the first is read, the connection is
    closed, and the next request gets its own answer on a new one."""

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter, req: bytes) -> bool:
        w.write(ok(req[-3:]) + ok(b"stray"))
        await w.drain()
        return True

    async with Server(answer) as srv:
        client = srv.client()
        assert await ask(client, b"one") == (200, b"one")
        assert await ask(client, b"two") == (200, b"two")
        await client.aclose()
    assert srv.connections == 2


async def test_an_early_answer_stops_the_body_and_the_connection_is_not_reused() -> None:
    """A 413 before the body was read: the client gets it, the writing stops, and the next
    request never shares that socket."""

    async def early(r: asyncio.StreamReader, w: asyncio.StreamWriter, _req: bytes) -> bool:
        w.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        await w.drain()
        return True

    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        requests.append(head)
        if not requests[1:]:
            await early(reader, writer, head)  # and reads nothing of the body
        else:
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(ok(b"two"))
            await writer.drain()
        await over.wait()
        writer.close()

    over = asyncio.Event()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client(
        f"http://127.0.0.1:{port}", connect_timeout_s=5, read_timeout_s=5, ssl_context=None
    )
    assert await ask(client, b"x" * (64 * 1024 * 1024)) == (413, b"no")
    assert await ask(client, b"{}") == (200, b"two")
    await client.aclose()
    over.set()
    server.close()
    await asyncio.sleep(0.05)
    assert len(requests) == 2  # the second on its own connection (each serve() takes one)


async def test_writing_a_body_nobody_reads_times_out() -> None:
    """An upstream that reads the head and never the body: after the read timeout without
    write progress, UpstreamTimeout, and the connection is dropped."""

    over = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await over.wait()
        writer.close()

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client(
        f"http://127.0.0.1:{port}", connect_timeout_s=5, read_timeout_s=0.3, ssl_context=None
    )
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout):
        await ask(client, b"x" * (64 * 1024 * 1024))
    assert asyncio.get_running_loop().time() - t0 < 3
    assert not client._busy and not client._idle
    await client.aclose()
    over.set()
    server.close()
    await asyncio.sleep(0.05)


async def test_a_head_answer_ends_with_its_head() -> None:
    """HEAD: Content-Length describes a body that is not sent; the answer ends at its head."""
    async with Server(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")) as srv:
        client = srv.client()
        async with client.request("HEAD", "/v1/models", CIMultiDict(), b"") as resp:
            assert resp.status == 200 and resp.content_length == 50
            assert await resp.read() == b""
        await client.aclose()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_a_coded_body_cut_short_is_an_error_not_a_short_answer(coding: str) -> None:
    """The coded stream must end where the body does: a cut one is an upstream error."""
    data = bytes(range(256)) * 64
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[coding](data)
    decoder = http1._Decoder(coding)
    out = b"".join(decoder.pieces(packed[: len(packed) // 2]))
    assert len(out) < len(data)
    with pytest.raises(UpstreamError, match="ended early"):
        list(decoder.rest())
    whole = http1._Decoder(coding)
    assert b"".join([*whole.pieces(packed), *whole.rest()]) == data


def test_an_egress_proxy_that_is_not_http_stops_the_start_naming_the_variable() -> None:
    """A socks or https egress proxy is refused at start-up (ConfigError), its password
    never shown."""
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="HTTPS_PROXY") as refused:
        Client(
            "https://api.openai.com",
            connect_timeout_s=1,
            read_timeout_s=1,
            ssl_context=None,
            environ={"HTTPS_PROXY": "socks5://user:hunter2@p:1080"},
        )
    assert "hunter2" not in str(refused.value)


async def test_an_address_that_does_not_answer_does_not_hold_the_next_one_back() -> None:
    """Happy Eyeballs: with a first address that never answers (a black hole), the next is
    tried 250 ms later, and the request is answered long before the connect timeout."""
    import socket
    import time

    # A black hole: a listening socket whose accept queue is full drops new SYNs.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(hole.getsockname())
        fillers.append(filler)
    try:
        async with Server(fixed(ok(b"x"))) as srv:
            client = Client(
                f"http://upstream.test:{srv.port}",
                connect_timeout_s=10,
                read_timeout_s=5,
                ssl_context=None,
                environ={},
            )
            infos: list[AddrInfoType] = [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", tuple(address))
                for address in (hole.getsockname(), ("127.0.0.1", srv.port))
            ]
            client._dns[("upstream.test", srv.port)] = (infos, time.monotonic() + 60)
            t0 = time.monotonic()
            assert await ask(client) == (200, b"x")
            assert 0.2 < time.monotonic() - t0 < 3  # the hole held it back 250 ms, no more
            await client.aclose()
    finally:
        for filler in fillers:
            filler.close()
        hole.close()

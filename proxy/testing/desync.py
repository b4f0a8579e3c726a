"""ScriptedUpstream: a raw asyncio upstream that misbehaves at the connection level, on
purpose, the way an upstream (or a box in front of it) can desynchronise a keep-alive pool.

Every answer names the credential it was made for (`[who:xxxxxxxx]`, a hash of the
Authorization / api-key / x-api-key headers) and echoes the prompt, so an answer that reaches
another tenant is visible. What it does for a request is `behave(request)`, a Behaviour:

- NORMAL: the answer.
- EXTRA_SAME_WRITE: the answer and a second whole answer in the same write.
- EXTRA_LATE: the answer; a moment later, while the connection is idle (no byte of a next
  request arrived: the kernel is asked), a second whole answer.
- IDLE_408: the answer; a moment later, while idle, a `408` and the connection closed.
- EARLY: a 401 as soon as the head arrived, before the body is read; then the body is read
  (and checked: a request head inside it is a desync, recorded in `violations`).
- READ_CLOSE: reads the request, closes without a byte.
- HEAD_ONLY: reads the head, never the body, says nothing (until the client gives up).
- CLOSE_MID: the head and half the body, then closes.
- DELAY: the answer after a short pause.
- CUT_GZIP / CUT_BR: the answer compressed, cut short, framed right (Content-Length of what
  is sent).
- BODY_AFTER_204: a 204 followed by body bytes in the same write.

Each request may carry `X-Fuzz-Id`; an id seen twice is a resent request (`violations`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import fcntl
import gzip
import hashlib
import ssl
import termios
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import brotli
import orjson


class Behaviour(enum.Enum):
    NORMAL = "normal"
    EXTRA_SAME_WRITE = "extra_same_write"
    EXTRA_LATE = "extra_late"
    IDLE_408 = "idle_408"
    EARLY = "early"
    READ_CLOSE = "read_close"
    HEAD_ONLY = "head_only"
    CLOSE_MID = "close_mid"
    DELAY = "delay"
    CUT_GZIP = "cut_gzip"
    CUT_BR = "cut_br"
    BODY_AFTER_204 = "body_after_204"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int
    """Which connection it came on (1, 2, ...)."""


CROSSING_S = 0.05
"""A request read this soon after an unsolicited answer was written may have crossed it even
if it was not there yet when that answer was written: the client may have looked for
unsolicited bytes just before the answer landed and been descheduled before its write. Later
than that, the client kept a connection it should have closed."""


def who(headers: dict[str, str]) -> str:
    """The short hash that names a credential in every answer."""
    credential = "|".join(
        headers.get(name, "") for name in ("authorization", "api-key", "x-api-key")
    )
    return hashlib.sha256(credential.encode()).hexdigest()[:8]


def prompt_of(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(doc, dict):
        messages = doc.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            return str(messages[-1].get("content", ""))
        if "input" in doc:
            return str(doc["input"])
    return ""


def answer_body(req: Request) -> bytes:
    """A chat completion naming the request's credential and echoing its prompt."""
    content = f"[who:{who(req.headers)}] {prompt_of(req.body)}"
    return orjson.dumps(
        {
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


SPEECH = bytes(range(256)) * 400
"""What /v1/audio/speech answers (gzip-coded on the wire)."""


def stream_body(req: Request) -> bytes:
    """The same answer as a chat completion stream (three content chunks, then [DONE]). The
    first chunk holds the whole `[who:...]` name, so that even the raw bytes of a stream
    read by a request that did not ask for one name its credential."""
    name, rest = f"[who:{who(req.headers)}]", f" {prompt_of(req.body)}"
    third = max(1, len(rest) // 3)
    pieces = [name + rest[:third], rest[third : 2 * third], rest[2 * third :]]
    events = []
    for i, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk = {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    last = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    events.append(b"data: " + orjson.dumps(last) + b"\n\n")
    return b"".join(events) + b"data: [DONE]\n\n"


def message(
    status: int,
    body: bytes,
    *extra: str,
    length: int | None = None,
    ctype: str = "application/json",
) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
    head += "".join(f"{line}\r\n" for line in extra)
    head += f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    return head.encode() + body


@dataclass
class ScriptedUpstream:
    behave: Callable[[Request], Behaviour] = lambda _req: Behaviour.NORMAL
    ssl_context: ssl.SSLContext | None = None
    late_s: float = 0.05
    """How long after an answer EXTRA_LATE / IDLE_408 strike (if the connection is idle)."""
    delay_s: float = 0.2
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    behaviours: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    _ids: set[str] = field(default_factory=set)
    crossed: dict[str, str] = field(default_factory=dict)
    """Requests that crossed an unsolicited answer on the wire (by X-Fuzz-Id), each with the
    words that name that answer (`[who:...] prompt`, or its error's message): the request's
    bytes had reached this upstream when the answer was written (on loopback a write lands
    in the peer's buffer at once, so the client wrote its request before the answer reached
    it), or came within CROSSING_S. No HTTP/1.1 client can tell such an answer from its own;
    everything else must never read one: a request that comes after an unsolicited answer
    without having crossed it is a violation (the client kept a connection it should have
    closed).

    A crossing leaves its connection shifted: the client took the unsolicited answer for its
    request, so the answer to that request comes one behind, unsolicited too, and a request
    already written when it is written crosses it in turn."""
    _shifted: set[int] = field(default_factory=set)
    """Connections on which a request crossed an unsolicited answer."""
    _unsolicited: dict[int, tuple[str, bool, float]] = field(default_factory=dict)
    """Per connection, the last unsolicited answer written on it and not yet followed by a
    request: the words that name it, whether a next request was already there, and when."""
    history: dict[int, list[str]] = field(default_factory=dict)
    """Per connection, what happened on it in order: each request (its X-Fuzz-Id's first 8
    characters, its credential's name, its behaviour), each unsolicited answer (see story)."""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            while await self._one(reader, writer, number):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> bool:
        """Serve one request; False: the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        method, path, headers = _parse_head(head)
        self._check_crossing(number, headers)
        length = int(headers.get("content-length", "0"))
        req = Request(method, path, headers, b"", number)
        how = self.behave(req)
        self.behaviours[how.value] += 1
        self._note(number, f"{headers.get('x-fuzz-id', '-')[:8]} {who(headers)} {how.value}")
        if how is Behaviour.HEAD_ONLY:
            self.requests.append(req)
            await asyncio.sleep(3600)  # reads nothing more (stop() ends it)
            return False
        if how is Behaviour.EARLY:
            self.requests.append(req)
            await self._early(reader, writer, req, length)
            return True
        req.body = await reader.readexactly(length)
        self.requests.append(req)
        self._check_resent(headers.get("x-fuzz-id"))
        plain = _plain_answer(req)
        if plain is None and path.endswith("/audio/speech"):
            plain = _speech(how)
        if plain is not None:
            self._write(reader, writer, req, plain, marker=f"[who:{who(headers)}]")
            await writer.drain()
            return True
        answer, ctype = answer_body(req), "application/json"
        if b'"stream":true' in req.body.replace(b" ", b""):
            answer, ctype = stream_body(req), "text/event-stream"
        return await self._answer(reader, writer, req, how, answer, ctype)

    def story(self, fuzz_ids: set[str]) -> str:
        """What happened, in order, on each connection that carried one of these requests."""
        short = {fuzz_id[:8] for fuzz_id in fuzz_ids}
        return "\n".join(
            f"connection {number}:\n  " + "\n  ".join(lines)
            for number, lines in self.history.items()
            if any(line.split()[1] in short for line in lines)
        )

    def _note(self, number: int, what: str) -> None:
        """One line of a connection's history (at most 200 a connection)."""
        lines = self.history.setdefault(number, [])
        if len(lines) < 200:
            lines.append(f"{time.monotonic():.4f} {what}")

    def _write(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: Request,
        answer: bytes,
        *,
        marker: str | None = None,
        unread: int = 0,
        extra: bool = False,
    ) -> None:
        """Write an answer to `req` (named by `marker`, by default its content). An `extra`
        one is unsolicited; so is any on a shifted connection (see `crossed`). For those, note
        whether a next request was already there (more bytes than `unread`, what is left of
        `req` itself)."""
        number = req.connection
        writer.write(answer)
        if not extra and number not in self._shifted:
            return
        if marker is None:
            marker = f"[who:{who(req.headers)}] {prompt_of(req.body)}"
        ahead = _pending(reader, writer) > unread
        self._unsolicited[number] = (marker, ahead, time.monotonic())
        kind = "an extra answer" if extra else "an answer one behind"
        self._note(number, f"{kind}, {'a next request already there' if ahead else 'idle'}")

    def _check_crossing(self, number: int, headers: dict[str, str]) -> None:
        """A request on a connection that got an unsolicited answer: crossed it on the wire
        if it was already there when that answer was written (or came within CROSSING_S),
        else a violation."""
        sent = self._unsolicited.pop(number, None)
        if sent is None:
            return
        marker, ahead, written_at = sent
        if ahead or time.monotonic() - written_at < CROSSING_S:
            self.crossed[headers.get("x-fuzz-id", "")] = marker
            self._shifted.add(number)
        else:
            self.violations.append("a connection was used after an unsolicited answer")

    def _check_resent(self, fuzz_id: str | None) -> None:
        """A request id seen before is a request sent twice: a violation."""
        if fuzz_id is None:
            return
        if fuzz_id in self._ids:
            self.violations.append(f"request {fuzz_id} was sent twice")
        self._ids.add(fuzz_id)

    async def _early(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request, length: int
    ) -> None:
        """EARLY: a 401 before the body is read, then the body read and checked for a
        request head inside it."""
        text = "answered before the body was read"
        answer = message(401, _error(req, text))
        self._write(
            reader, writer, req, answer, marker=f"[who:{who(req.headers)}] {text}", unread=length
        )
        await writer.drain()
        body = await reader.readexactly(length)
        if b" HTTP/1.1\r\n" in body or b"authorization:" in body.lower():
            self.violations.append("a request head arrived inside another's body")

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: Request,
        how: Behaviour,
        answer: bytes,
        ctype: str,
    ) -> bool:
        """Write the answer the way `how` says; False: the connection is done."""
        match how:
            case Behaviour.NORMAL:
                self._write(reader, writer, req, message(200, answer, ctype=ctype))
            case Behaviour.DELAY:
                await asyncio.sleep(self.delay_s)
                self._write(reader, writer, req, message(200, answer, ctype=ctype))
            case Behaviour.EXTRA_SAME_WRITE:
                self._write(
                    reader,
                    writer,
                    req,
                    message(200, answer, ctype=ctype) + message(200, answer, ctype=ctype),
                )
            case Behaviour.EXTRA_LATE | Behaviour.IDLE_408:
                return await self._late(reader, writer, req, how, answer, ctype)
            case Behaviour.READ_CLOSE:
                return False
            case Behaviour.CLOSE_MID:
                half = answer[: len(answer) // 2]
                self._write(
                    reader, writer, req, message(200, half, length=len(answer), ctype=ctype)
                )
                await writer.drain()
                return False
            case Behaviour.CUT_GZIP | Behaviour.CUT_BR:
                coded = (
                    gzip.compress(answer) if how is Behaviour.CUT_GZIP else brotli.compress(answer)
                )
                cut = coded[: max(1, len(coded) * 2 // 3)]
                coding = "gzip" if how is Behaviour.CUT_GZIP else "br"
                self._write(
                    reader,
                    writer,
                    req,
                    message(200, cut, f"Content-Encoding: {coding}", ctype=ctype),
                )
            case Behaviour.BODY_AFTER_204:
                self._write(reader, writer, req, b"HTTP/1.1 204 No Content\r\n\r\n" + answer)
            case Behaviour.EARLY | Behaviour.HEAD_ONLY:
                raise AssertionError("handled above")
        await writer.drain()
        return True

    async def _late(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: Request,
        how: Behaviour,
        answer: bytes,
        ctype: str,
    ) -> bool:
        """EXTRA_LATE / IDLE_408: the answer; a moment later, if the connection is idle, a
        second answer (EXTRA_LATE) or a 408 and the end of the connection (IDLE_408)."""
        self._write(reader, writer, req, message(200, answer, ctype=ctype))
        await writer.drain()
        await asyncio.sleep(self.late_s)
        if not _idle(reader, writer):
            return True  # a next request came: no longer "on an idle connection"
        if how is Behaviour.EXTRA_LATE:
            self._write(reader, writer, req, message(200, answer, ctype=ctype), extra=True)
            await writer.drain()
            return True
        self._write(reader, writer, req, message(408, b"", "Connection: close"))
        await writer.drain()
        return False


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """A request head -> its method, path and headers (names in lower case)."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


def _plain_answer(req: Request) -> bytes | None:
    """The answer no behaviour changes: a 401 without a credential, the model listing (its
    head only for HEAD); None for any other request."""
    if not any(name in req.headers for name in ("authorization", "api-key", "x-api-key")):
        return message(401, _error(req, "no credential"))
    if req.method == "HEAD" or req.path.endswith("/models"):
        listing = orjson.dumps({"object": "list", "data": [], "who": who(req.headers)})
        if req.method == "HEAD":
            return message(200, b"", length=len(listing))
        return message(200, listing)
    return None


def _speech(how: Behaviour) -> bytes:
    """/v1/audio/speech's answer, always gzip-coded (cut short for CUT_GZIP), or
    brotli-coded and cut short for CUT_BR."""
    if how is Behaviour.CUT_BR:
        return message(200, brotli.compress(SPEECH)[:-20], "Content-Encoding: br")
    coded = gzip.compress(SPEECH)
    if how is Behaviour.CUT_GZIP:
        coded = coded[: len(coded) // 2]
    return message(200, coded, "Content-Encoding: gzip", ctype="audio/mpeg")


def _pending(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Bytes that have arrived and are not read yet: in the reader's buffer and in the
    kernel's."""
    buffered = len(reader.__dict__.get("_buffer") or b"")
    sock = writer.get_extra_info("socket")
    if sock is None:
        return buffered
    waiting = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
    except OSError:
        return buffered
    return buffered + waiting[0]


def _idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """No byte of a next request has arrived (nor the connection's end)."""
    return not reader.at_eof() and _pending(reader, writer) == 0


def _error(req: Request, text: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": f"[who:{who(req.headers)}] {text}",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    )

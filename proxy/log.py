"""Logging: structlog with a lean chain, one JSON line per event, written in batches.

The per-request line is on the hit path, so the chain is short (a float timestamp, the
orjson renderer) and lines go to a buffer that a background task flushes a few times a second
(and at exit), instead of a write and flush per line. configure_logging() returns that buffer
(the sink); the app owns it through a RequestLog: it writes the request lines and flushes.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import IO, Any

import orjson
import structlog

FLUSH_EVERY_S = 0.2
DRAIN_BYTES = 64 * 1024
"""Lines buffered past this are written at once: a burst of requests (2,000 streams that end
together) holds at most this much of log lines, not a flush period's worth."""


BACKLOG_BYTES = 8 * 1024 * 1024
"""Log bytes that may wait for a stdout nobody reads; past this, lines are dropped (and
counted in a `log.dropped` line once stdout takes writes again)."""


class BufferedSink:
    """A file-like object for structlog's BytesLogger: write() buffers, drain() writes.

    With `threaded`, drain() hands the bytes to a writer thread and returns at once: a
    stdout that nobody reads (a full pipe, a stuck log shipper) blocks that thread, never the
    event loop. Up to BACKLOG_BYTES wait for it; more are dropped and counted."""

    def __init__(
        self, out: IO[bytes], *, threaded: bool = False, backlog_bytes: int = BACKLOG_BYTES
    ) -> None:
        self.out = out
        self._buf: list[bytes] = []
        self._size = 0
        self._backlog_bytes = backlog_bytes
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._dropped_lines = 0
        self._dropped_bytes = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._writer, name="log-writer", daemon=True)
            self._thread.start()

    def write(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > DRAIN_BYTES:
            self.drain()

    def flush(self) -> None:
        """BytesLogger flushes after every line; the real flush is drain()."""

    def drain(self) -> None:
        if not self._buf:
            return
        data, self._buf, self._size = b"".join(self._buf), [], 0
        if self._thread is None:
            self._write(data)
            return
        with self._lock:
            if self._pending_size + len(data) > self._backlog_bytes:
                self._dropped_lines += data.count(b"\n")
                self._dropped_bytes += len(data)
            else:
                self._pending.append(data)
                self._pending_size += len(data)
            self._ready.notify()

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain, and give the writer thread up to `timeout_s` to write what waits (exit)."""
        self.drain()
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._closing = True
            self._ready.notify()
        thread.join(timeout_s)

    @property
    def dropped_lines(self) -> int:
        """Lines dropped and not yet reported in a log.dropped line."""
        return self._dropped_lines

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except (OSError, ValueError):
            pass

    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._dropped_lines and not self._closing:
                    self._ready.wait()
                data = self._pending.popleft() if self._pending else b""
                dropped, lost = self._dropped_lines, self._dropped_bytes
                self._dropped_lines = self._dropped_bytes = 0
            if not data and not dropped:
                return  # closing, and everything was written
            if data:
                self._write(data)  # may block on a full pipe: only this thread waits
                with self._lock:
                    self._pending_size -= len(data)
            if dropped:
                self._write(_dropped_line(dropped, lost))


def _dropped_line(lines: int, nbytes: int) -> bytes:
    fields = {
        "lines": lines,
        "bytes": nbytes,
        "reason": "stdout took no writes and the backlog was full",
        "event": "log.dropped",
        "level": "warning",
        "ts": round(time.time(), 3),
    }
    return orjson.dumps(fields) + b"\n"


_log = structlog.get_logger()


def _timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["ts"] = round(time.time(), 3)
    return event


def _orjson_bytes(_: Any, __: str, event: MutableMapping[str, Any]) -> bytes:
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS, default=str)


def configure_logging(fmt: str = "json", out: IO[bytes] | None = None) -> BufferedSink | None:
    """json: buffered JSON lines on stdout (or `out`), and the buffer is returned (its owner
    flushes it; it is drained at exit too); console: structlog's readable renderer, None."""
    if fmt == "console":
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
            ],
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(20),
            cache_logger_on_first_use=True,
        )
        return None
    # stdout goes through a writer thread (a full pipe must not stall the loop); a file given
    # as `out` is written to directly
    sink = BufferedSink(out if out is not None else sys.stdout.buffer, threaded=out is None)
    atexit.register(sink.close)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            _orjson_bytes,
        ],
        logger_factory=structlog.BytesLoggerFactory(file=sink),  # type: ignore[arg-type]
        wrapper_class=structlog.make_filtering_bound_logger(20),
        cache_logger_on_first_use=True,
    )
    return sink


class _AiohttpGuard(logging.Handler):
    """aiohttp's own error lines, redacted: its server logs a malformed request with the
    exception, whose message quotes the raw header or body bytes (an Authorization value, the
    start of a prompt). Only the exception's type and status go out, as a structlog event."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        fields: dict[str, Any] = {"logger": record.name}
        if exc is not None:
            fields["error"] = type(exc).__name__
            code = getattr(exc, "code", None) or getattr(exc, "status", None)
            if isinstance(code, int):
                fields["status"] = code
        _log.warning("http.error" if exc is not None else "http.warning", **fields)


_GUARD = _AiohttpGuard(level=logging.WARNING)


def guard_aiohttp_logs() -> None:
    """Route every aiohttp logger through the redacting guard (idempotent)."""
    logger = logging.getLogger("aiohttp")
    if _GUARD not in logger.handlers:
        logger.addHandler(_GUARD)
    logger.propagate = False
    if logger.level == logging.NOTSET or logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)


class RequestLog:
    """The per-request lines, and the flushing of the sink they (and structlog) write to."""

    def __init__(self, sink: BufferedSink | None = None) -> None:
        self.sink = sink
        """configure_logging's buffer (json mode); None: lines go through structlog."""

    def done(self, fields: dict[str, Any]) -> None:
        """Log the canonical per-request line.

        In json mode it is written straight to the buffer in exactly the shape the structlog
        chain produces (the fields, then event, level, ts): the line is on the cache-hit path,
        where structlog's generic dispatch measured as the largest single cost. Otherwise
        (console mode, tests capturing logs) it goes through structlog like every other event.
        """
        sink = self.sink
        if sink is None:
            _log.info("request.done", **fields)
            return
        fields["event"] = "request.done"
        fields["level"] = "info"
        fields["ts"] = round(time.time(), 3)
        # (every key is a str: orjson's OPT_NON_STR_KEYS path would cost twice as much)
        sink.write(orjson.dumps(fields, default=str) + b"\n")

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.drain()

    async def flush_forever(self) -> None:
        """Background task: drain the buffer a few times a second until cancelled."""
        try:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                self.flush()
        finally:
            self.flush()

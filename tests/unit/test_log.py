"""The JSON log sink: buffered, drained on a timer and past a size."""

from __future__ import annotations

import io
import os
import threading
import time

import orjson

from proxy.log import DRAIN_BYTES, BufferedSink


def test_the_sink_writes_once_it_holds_more_than_drain_bytes() -> None:
    """A burst of lines is written as soon as it passes DRAIN_BYTES, not held for the next
    timed drain; smaller amounts wait for drain()."""
    out = io.BytesIO()
    sink = BufferedSink(out)
    line = b'{"event":"request.done"}' + b" " * 1000 + b"\n"
    k = DRAIN_BYTES // len(line) + 1  # the line that takes the buffer past DRAIN_BYTES
    for _ in range(k - 1):
        sink.write(line)
    assert out.getvalue() == b""
    sink.write(line)
    assert out.getvalue() == line * k
    sink.write(line)
    sink.drain()
    assert out.getvalue() == line * (k + 1)


def test_a_full_pipe_blocks_the_writer_thread_not_the_caller() -> None:
    """drain() returns at once while nobody reads the pipe; past the backlog, lines are
    dropped and counted, and a log.dropped line says so once the pipe is read again."""
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    sink = BufferedSink(out, threaded=True, backlog_bytes=256 * 1024)
    line = b'{"event":"request.done"}' + b" " * 1000 + b"\n"
    slowest = 0.0
    for _ in range(2000):  # 2 MB: the pipe holds 64 KB, the backlog 256 KB more
        t0 = time.monotonic()
        sink.write(line)
        slowest = max(slowest, time.monotonic() - t0)
    sink.drain()
    assert slowest < 0.1
    assert 0 < sink.dropped_lines < 2000
    got = bytearray()
    with os.fdopen(read_end, "rb") as pipe:

        def close() -> None:
            sink.close()
            out.close()

        closer = threading.Thread(target=close)
        closer.start()
        while chunk := pipe.read(65536):
            got += chunk
        closer.join()
    lines = bytes(got).splitlines()
    notes = [orjson.loads(ln) for ln in lines if b"log.dropped" in ln]
    kept = [ln for ln in lines if b"request.done" in ln]
    assert len(notes) >= 1 and notes[0]["level"] == "warning"
    assert len(kept) + sum(n["lines"] for n in notes) == 2000
    assert all(ln == line.rstrip(b"\n") for ln in kept)

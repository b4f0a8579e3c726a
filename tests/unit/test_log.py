"""The JSON log sink: buffered, drained on a timer and past a size."""

from __future__ import annotations

import array
import fcntl
import io
import os
import termios
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
    """write() and drain() return while nobody reads the pipe; past the backlog, lines are
    dropped and counted, and a log.dropped line says so once the pipe is read again."""
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    sink = BufferedSink(out, threaded=True, backlog_bytes=256 * 1024)
    line = b'{"event":"request.done"}' + b" " * 1000 + b"\n"

    def caller() -> None:
        for _ in range(2000):  # 2 MB: the pipe holds 64 KB, the backlog 256 KB more
            sink.write(line)
        sink.drain()

    writes = threading.Thread(target=caller, daemon=True)
    writes.start()
    writes.join(timeout=10)  # about 10 ms; a write that waits for the pipe never ends
    if writes.is_alive():
        os.close(read_end)  # (its write then fails, and the thread ends)
        raise AssertionError("the caller waited for the full pipe")
    full = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + 10
    while _unread(read_end) < full:  # the writer thread fills it (and waits there)
        assert time.monotonic() < deadline, "the pipe never filled"
        time.sleep(0.01)
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
    assert 0 < len(kept) < 2000
    assert len(kept) + sum(n["lines"] for n in notes) == 2000
    assert all(ln == line.rstrip(b"\n") for ln in kept)


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe, from its read end."""
    got = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, got)
    return got[0]

"""The JSON log sink: buffered, drained on a timer and past a size."""

from __future__ import annotations

import io

from proxy.log import DRAIN_BYTES, BufferedSink


def test_the_sink_writes_once_it_holds_more_than_drain_bytes():
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

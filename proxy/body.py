"""Request bodies sent with a Content-Encoding: decoded here, capped while decoding. Pure.

The server reads request bodies raw (aiohttp's own decoding is off), so the proxy alone decides
what an encoded body becomes: it is decoded once, the decoded bytes are keyed and forwarded
*without* the Content-Encoding header (never decoded bytes under a gzip header), and no more
than `limit` decoded bytes are ever produced, so a small bomb that would inflate to gigabytes
stops at the cap (413) with memory bounded by it.
"""

from __future__ import annotations

import zlib

try:
    import brotli
except ImportError:  # pragma: no cover - brotli is a dependency; without it br passes through
    brotli = None

from proxy.errors import BadBody, BodyTooLarge, UnknownEncoding

STEP = 1024 * 1024
"""Largest piece produced by one decompressor call."""


def codings(header: str) -> list[str]:
    """The codings of a Content-Encoding header, in the order they were applied."""
    out = []
    for part in header.split(","):
        coding = part.strip().lower()
        if coding and coding != "identity":
            out.append("gzip" if coding == "x-gzip" else coding)
    return out


def decodable(header: str) -> bool:
    """Can every coding of this header be decoded here?"""
    return all(
        c in ("gzip", "deflate") or (c == "br" and brotli is not None) for c in codings(header)
    )


def decode(data: bytes, header: str, limit: int) -> bytes:
    """`data` with every coding of `header` undone (last applied first).

    Raises BodyTooLarge past `limit` decoded bytes (checked while decoding), BadBody for data
    that is not what the header says, UnknownEncoding for a coding it cannot decode."""
    if not decodable(header):
        raise UnknownEncoding(header)
    for coding in reversed(codings(header)):
        data = _brotli(data, limit) if coding == "br" else _zlib(data, coding, limit)
    return data


def _zlib(data: bytes, coding: str, limit: int) -> bytes:
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif data[:1] and data[0] & 0x0F == 8:
        wbits = zlib.MAX_WBITS  # deflate as RFC 9110 means it: a zlib stream
    else:
        wbits = -zlib.MAX_WBITS  # raw deflate, which some clients send instead
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits)
            while True:
                out += d.decompress(rest, min(STEP, limit + 1 - len(out)))
                if len(out) > limit:
                    raise BodyTooLarge
                rest = d.unconsumed_tail
                if d.eof or not rest:
                    break
            if not d.eof:
                raise BadBody(f"The {coding}-encoded request body is truncated.")
            rest = d.unused_data  # gzip allows several members one after another
            if coding != "gzip" and rest:
                raise BadBody(f"The {coding}-encoded request body has trailing bytes.")
    except zlib.error:
        raise BadBody(f"The request body is not valid {coding} data.") from None
    return bytes(out)


def _brotli(data: bytes, limit: int) -> bytes:
    assert brotli is not None
    d = brotli.Decompressor()
    out = bytearray()
    try:
        piece = d.process(data, output_buffer_limit=STEP)
        while True:
            out += piece
            if len(out) > limit:
                raise BodyTooLarge
            if d.can_accept_more_data():
                break
            piece = d.process(b"", output_buffer_limit=STEP)
    except brotli.error:
        raise BadBody("The request body is not valid br data.") from None
    if not d.is_finished():
        raise BadBody("The br-encoded request body is truncated.")
    return bytes(out)

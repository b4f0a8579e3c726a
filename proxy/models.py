"""The stored answer: status, headers and body as ready bytes, so a HIT never re-serialises."""

from __future__ import annotations

import fnmatch
import time
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.cost import money_fields
from proxy.errors import CorruptEntry
from proxy.status import CacheStatus, status_pair

_MAGIC = b"OCP1"
_COMPRESSED = b"OCZ1"
COMPRESS_ABOVE = 16 * 1024
"""Serialised entries larger than this are stored zlib-compressed (to_bytes)."""


class Clock:
    """Wall-clock time on the shared store's clock: `offset` is the store's time minus this
    machine's (Redis TIME, read at start-up), so `created`, Age and max-age agree across
    instances whose clocks differ. 0 for stores that live on this machine."""

    offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


CLOCK = Clock()
"""The process's one clock; RedisStore.warm sets its offset."""


@dataclass(slots=True)
class CachedResponse:
    """One upstream answer as it was recorded, ready to be sent again. Never changed once
    made (shared by every reader); not a frozen dataclass only because a frozen __init__
    costs three times as much, and one is made on every MISS.

    `body` is the whole body, byte for byte. For a stream, `chunk_ends` are the end offsets of
    the chunks as they arrived and `chunk_ms` their arrival times after the first byte, so a
    paced replay can reproduce the timing; a fast replay just sends `body`.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    created: float
    """Unix time the answer was stored (for Age and max-age)."""
    stream: bool = False
    chunk_ends: Sequence[int] = ()
    chunk_ms: Sequence[float] = ()
    """Kept as arrays (8 bytes an item; a tuple of numbers costs 32 or more): a stream's
    entry is mostly these and its body."""
    upstream_ms: float = 0.0
    """How long upstream took to answer: what a HIT saves in time."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Usage and cost (tokens_in, tokens_out, cost_usd, model), the request fingerprint."""
    fresh_until: float = field(init=False, repr=False, compare=False)
    """`created` + the rule's ttl_s when it was stored (meta "ttl"): past it the answer is
    stale, kept only to be served when the upstream fails (stale-if-error)."""
    form: str = field(init=False, repr=False, compare=False)
    """"json", "sse" or "sse+usage" (a chat stream with its usage chunk): what a twin of the
    other form needs converting from."""
    rebase: bool = field(init=False, repr=False, compare=False)
    """Its image links stand under PLACEHOLDER_BASE: each client gets them under its own base."""
    _hit_headers: tuple[tuple[str, str], ...] | None = field(
        init=False, repr=False, compare=False, default=None
    )
    _saved_fields: dict[str, Any] | None = field(
        init=False, repr=False, compare=False, default=None
    )
    size: int = field(init=False, repr=False, compare=False)
    """Bytes it holds, roughly (body, chunk tables, the object): what store limits count."""

    def __post_init__(self) -> None:
        if self.chunk_ends and not isinstance(self.chunk_ends, array):
            self.chunk_ends = array("q", self.chunk_ends)
        if self.chunk_ms and not isinstance(self.chunk_ms, array):
            self.chunk_ms = array("d", self.chunk_ms)
        meta = self.meta
        ttl = meta.get("ttl")
        fresh = self.created + float(ttl) if isinstance(ttl, int | float) else float("inf")
        form = ("sse+usage" if meta.get("sse_usage") else "sse") if self.stream else "json"
        self.fresh_until = fresh
        self.form = form
        self.rebase = bool(meta.get("rebase"))
        self.size = len(self.body) + 64 * len(self.chunk_ends) + 256

    @property
    def hit_headers(self) -> tuple[tuple[str, str], ...]:
        """`headers` plus the HIT status headers, built on the first HIT (most answers are
        never reused): later HITs only add Age."""
        built = self._hit_headers
        if built is None:
            built = (*self.headers, *status_pair(CacheStatus.HIT))
            self._hit_headers = built
        return built

    @property
    def saved_fields(self) -> dict[str, Any]:
        """The log fields of a request that reuses this answer (saved_ms, tokens, saved_usd),
        built on first use."""
        saved = self._saved_fields
        if saved is None:
            saved = {
                "saved_ms": self.upstream_ms,
                **money_fields(self.meta.get("cost"), saved=True),
            }
            self._saved_fields = saved
        return saved

    def chunks(self) -> list[bytes]:
        """The body cut where the upstream chunks ended."""
        if not self.chunk_ends:
            return [self.body]
        out, start = [], 0
        for end in self.chunk_ends:
            out.append(self.body[start:end])
            start = end
        if start < len(self.body):
            out.append(self.body[start:])
        return out

    def to_bytes(self, compress_above: int = COMPRESS_ABOVE) -> bytes:
        """Serialised form for stores: magic, a JSON head, then the raw body."""
        head = orjson.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "c": self.created,
                "st": self.stream,
                "ce": list(self.chunk_ends),
                "cm": list(self.chunk_ms),
                "u": self.upstream_ms,
                "m": self.meta,
            }
        )
        raw = len(head).to_bytes(4, "big") + head + self.body
        if len(raw) > compress_above:
            return _COMPRESSED + zlib.compress(raw, 3)
        return _MAGIC + raw

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedResponse:
        """Inverse of to_bytes; CorruptEntry (a ValueError) on anything else, never another
        exception: a damaged entry is a MISS, not a store failure."""
        try:
            magic, raw = data[:4], data[4:]
            if magic == _COMPRESSED:
                raw = zlib.decompress(raw)
            elif magic != _MAGIC:
                raise CorruptEntry("not a stored answer")
            n = int.from_bytes(raw[:4], "big")
            head = orjson.loads(raw[4 : 4 + n])
            entry = cls(
                status=int(head["s"]),
                headers=tuple((str(k), str(v)) for k, v in head["h"]),
                body=raw[4 + n :],
                created=float(head["c"]),
                stream=bool(head["st"]),
                chunk_ends=array("q", head["ce"]) if head["ce"] else (),
                chunk_ms=array("d", head["cm"]) if head["cm"] else (),
                upstream_ms=float(head["u"]),
                meta=dict(head["m"]),
            )
        except CorruptEntry:
            raise
        except Exception as exc:  # any damage at all: zlib, JSON, types, missing fields
            raise CorruptEntry(f"damaged stored answer ({type(exc).__name__})") from None
        if not 100 <= entry.status < 600 or (
            entry.chunk_ends and entry.chunk_ends[-1] > len(entry.body)
        ):
            raise CorruptEntry("damaged stored answer (inconsistent)")
        return entry


def purged_fill(key: str, entry: CachedResponse, purges: Iterable[tuple[float, str]]) -> bool:
    """Did a purge of `purges` ((when, key glob) pairs) name `key` after the fill of `entry`
    began? Its upstream read began upstream_ms before the entry was made (`created`, a few
    ms at most after the read ended): an answer asked for after the purge is kept, one asked
    for before it is not. Every store's purge log is read through this one rule."""
    began = entry.created - entry.upstream_ms / 1000.0
    return any(began <= at and fnmatch.fnmatchcase(key, pattern) for at, pattern in purges)

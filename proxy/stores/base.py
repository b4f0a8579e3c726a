"""The Store protocol every cache backend implements."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

import structlog

from proxy.errors import CorruptEntry
from proxy.keys import key_id
from proxy.models import CachedResponse

log = structlog.get_logger()


class Deletes(Protocol):
    """A store that can name itself in a log line and drop a key."""

    @property
    def name(self) -> str: ...

    async def delete(self, key: str) -> None: ...


async def entry_of(store: Deletes, key: str, raw: bytes | None) -> CachedResponse | None:
    """A stored value as an entry: None when absent; a damaged one is logged, deleted and read
    as absent (a MISS that replaces it), the same in every store."""
    if raw is None:
        return None
    try:
        return CachedResponse.from_bytes(raw)
    except CorruptEntry as exc:
        log.warning("store.corrupt_entry", store=store.name, key=key_id(key), error=str(exc))
        await store.delete(key)
        return None


class Store(Protocol):
    """A key -> CachedResponse map with a TTL per entry. Raises StoreUnavailable on failure."""

    name: str

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...

    async def vectors_add(
        self, part: str, member: str, record: bytes, expires: float, keep: int
    ) -> None:
        """Append one semantic index record to partition `part` (newest `keep` are kept).
        `member` is the entry it indexes: where the store can, deleting that entry deletes
        the record."""

    async def vectors_since(self, part: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` records of `part` added after sequence number `after`, oldest first,
        as (sequence number, record)."""
        ...


@runtime_checkable
class Enqueues(Protocol):
    """A store that also takes writes without waiting for them (SQLite's group commit)."""

    def enqueue(self, key: str, entry: CachedResponse, ttl_s: float) -> asyncio.Future[Any]:
        """Queue the write for the next batch; that batch's future (StoreUnavailable if it
        failed)."""
        ...

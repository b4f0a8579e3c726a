"""The Store protocol every cache backend implements."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from proxy.models import CachedResponse


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

"""The Store protocol every cache backend implements."""

from __future__ import annotations

from typing import Protocol

from proxy.models import CachedResponse


class Store(Protocol):
    """A key -> CachedResponse map with a TTL per entry. Raises StoreUnavailable on failure."""

    name: str

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...

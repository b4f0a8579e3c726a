"""In-process LRU store, bounded by bytes."""

from __future__ import annotations

import fnmatch
import time
from collections import OrderedDict

from proxy.models import CachedResponse


class MemoryStore:
    """An LRU map bounded by the total size of its entries; nothing survives a restart."""

    name = "memory"

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._vectors: dict[str, dict[int, tuple[str, float, bytes]]] = {}
        """Semantic index: partition -> seq -> (member, expires, record), oldest first."""
        self._members: dict[str, tuple[str, int]] = {}
        """member -> (partition, seq) of its record: dropping an entry drops its record."""
        self._seq = 0

    async def get(self, key: str) -> CachedResponse | None:
        return self.peek(key)

    def peek(self, key: str) -> CachedResponse | None:
        """get() without a coroutine, for the hot tier in front of another store."""
        item = self._items.get(key)
        if item is None:
            return None
        expires, entry = item
        if expires < time.time():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return entry

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        self.put(key, entry, ttl_s)

    def put(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        if entry.size > self.max_bytes:
            return
        self._drop(key)
        self._items[key] = (time.time() + ttl_s, entry)
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest)

    async def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1].size
        if key in self._members:
            self._drop_record(key)

    def _drop_record(self, member: str) -> None:
        part, seq = self._members.pop(member)
        records = self._vectors.get(part)
        if records is not None:
            gone = records.pop(seq, None)
            if gone is not None:
                self.bytes -= len(gone[2])
            if not records:
                del self._vectors[part]

    async def vectors_add(
        self, part: str, member: str, record: bytes, expires: float, keep: int
    ) -> None:
        """Index records count against max_bytes and go with their entry."""
        if member not in self._items:
            return
        if member in self._members:
            self._drop_record(member)
        self._seq += 1
        records = self._vectors.setdefault(part, {})
        records[self._seq] = (member, expires, record)
        self._members[member] = (part, self._seq)
        self.bytes += len(record)
        while len(records) > keep:
            self._drop_record(records[next(iter(records))][0])
        while self.bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))

    async def vectors_since(self, part: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        now = time.time()
        out: list[tuple[int, bytes]] = []
        for seq, (_, exp, rec) in reversed(self._vectors.get(part, {}).items()):
            if seq <= after:  # oldest first in the dict: the rest were read before
                break
            if exp >= now:
                out.append((seq, rec))
        out.reverse()
        return out[:limit]

    async def purge(self, pattern: str) -> int:
        """Drop every entry whose key matches the glob `pattern`; how many went."""
        return self.purge_now(pattern)

    def purge_now(self, pattern: str) -> int:
        gone = [k for k in self._items if fnmatch.fnmatchcase(k, pattern)]
        for key in gone:
            self._drop(key)
        return len(gone)

    def __len__(self) -> int:
        return len(self._items)

    async def aclose(self) -> None:
        self._items.clear()
        self._vectors.clear()
        self._members.clear()
        self.bytes = 0

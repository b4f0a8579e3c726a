"""The memory store and store URLs."""

from __future__ import annotations

import time

import pytest

from proxy.errors import ConfigError
from proxy.models import CachedResponse
from proxy.stores import MemoryStore, open_store


def entry(n: int) -> CachedResponse:
    return CachedResponse(200, (), b"x" * n, time.time())


async def test_memory_store_stays_under_its_byte_bound():
    """The LRU evicts the least recently used entries to stay under max_bytes."""
    store = MemoryStore(max_bytes=10_000)
    for i in range(50):
        await store.set(f"k{i}", entry(1000), 60)
        assert store.bytes <= 10_000
    assert len(store) < 10
    await store.get("k45")  # touch: survives the next evictions
    for i in range(50, 55):
        await store.set(f"k{i}", entry(1000), 60)
    assert await store.get("k45") is not None and await store.get("k40") is None
    await store.set("huge", entry(20_000), 60)  # larger than the bound: not kept
    assert await store.get("huge") is None and store.bytes <= 10_000


async def test_memory_store_ttl():
    """Expired entries are gone."""
    store = MemoryStore()
    await store.set("k", entry(1), -1)
    assert await store.get("k") is None and store.bytes == 0


def test_open_store_urls(tmp_path):
    """Store URLs map to their backends; an empty one is SQLite in the data dir."""
    assert open_store("memory://?max_mb=1", tmp_path).name == "memory"
    assert open_store("", tmp_path).name == "sqlite"
    assert open_store(f"sqlite:///{tmp_path}/c.db", tmp_path).name == "sqlite"
    with pytest.raises(ConfigError, match="max_mb"):
        open_store("memory://?max_mb=lots", tmp_path)

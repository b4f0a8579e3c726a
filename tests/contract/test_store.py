"""One contract for every cache store: the same behaviour from memory, SQLite and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.models import CachedResponse
from proxy.stores import open_store
from tests.conftest import start_redis


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/cache.db"
    else:
        server = start_redis()
        yield server.url + "?prefix=contract"
        server.stop()


def answer(body: bytes = b'{"ok": true}', **kw: Any) -> CachedResponse:
    return CachedResponse(
        200,
        (("Content-Type", "application/json"), ("x-request-id", "req_1")),
        body,
        time.time(),
        **kw,
    )


async def test_set_get_delete(store_url: str, tmp_path: Path) -> None:
    """What is set comes back equal; delete removes it; unknown keys are None."""
    store = open_store(store_url, tmp_path)
    try:
        assert await store.get("v1:missing") is None
        entry = answer(meta={"cost": {"tokens_in": 3, "tokens_out": 4, "cost_usd": 0.1}})
        await store.set("v1:a", entry, 60)
        assert await store.get("v1:a") == entry
        await store.delete("v1:a")
        assert await store.get("v1:a") is None
    finally:
        await store.aclose()


async def test_streams_round_trip_with_their_chunks(store_url: str, tmp_path: Path) -> None:
    """A large recorded stream keeps its bytes, chunk boundaries and timing."""
    body = b"".join(b'data: {"i": %d}\n\n' % i for i in range(5000))
    ends = (*tuple(range(16, len(body), 4096)), len(body))
    entry = answer(
        body, stream=True, chunk_ends=ends, chunk_ms=tuple(float(i) for i in range(len(ends)))
    )
    store = open_store(store_url, tmp_path)
    try:
        await store.set("v1:s", entry, 60)
        back = await store.get("v1:s")
        assert back == entry and b"".join(back.chunks()) == body
    finally:
        await store.aclose()


async def test_entries_expire(store_url: str, tmp_path: Path) -> None:
    """An entry is gone after its TTL."""
    store = open_store(store_url, tmp_path)
    try:
        await store.set("v1:t", answer(), 0.2)
        assert await store.get("v1:t") is not None
        await asyncio.sleep(0.35)
        assert await store.get("v1:t") is None
    finally:
        await store.aclose()


async def test_overwrite_replaces(store_url: str, tmp_path: Path) -> None:
    """A REFRESH writes over the old entry."""
    store = open_store(store_url, tmp_path)
    try:
        await store.set("v1:o", answer(b"old"), 60)
        await store.set("v1:o", answer(b"new"), 60)
        got = await store.get("v1:o")
        assert got is not None and got.body == b"new"
    finally:
        await store.aclose()


async def test_many_keys_in_one_read(store_url: str, tmp_path: Path) -> None:
    """Cache.get_many (embeddings items) answers each key as get() does, in order, through
    a store's batch read (SQLite IN, Redis MGET) or a read per key; expired keys are None."""
    from proxy.cache import Cache

    store = open_store(store_url, tmp_path)
    cache = Cache(store)
    try:
        entries = {f"v1:k{i}": answer(b"%d" % i) for i in range(520)}  # more than one IN
        for key, entry in entries.items():
            await store.set(key, entry, 60)
        await store.set("v1:gone", answer(b"old"), 0.001)
        await asyncio.sleep(0.01)
        keys = ["v1:missing", *entries, "v1:gone", "v1:k3"]
        got = await cache.get_many(keys)
        assert got[0] is None and got[-2] is None
        assert got[1:-2] == list(entries.values()) and got[-1] == entries["v1:k3"]
    finally:
        await store.aclose()

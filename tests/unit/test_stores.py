"""The memory store, store URLs, the cache's writes without waiting (Cache.put), and the
shared clock read from Redis."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache import Cache
from proxy.errors import ConfigError, StoreUnavailable
from proxy.models import CLOCK, CachedResponse
from proxy.stores import MemoryStore, open_store
from proxy.stores.keyfilter import KeyFilter
from proxy.stores.redis import RedisStore
from proxy.stores.sqlite import SQLiteStore
from tests.conftest import RedisServer
from tests.helpers import wait_until


def entry(n: int) -> CachedResponse:
    return CachedResponse(200, (), b"x" * n, time.time())


async def test_memory_store_stays_under_its_byte_bound() -> None:
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


async def test_memory_store_ttl() -> None:
    """Expired entries are gone."""
    store = MemoryStore()
    await store.set("k", entry(1), -1)
    assert await store.get("k") is None and store.bytes == 0


def test_open_store_urls(tmp_path: Path) -> None:
    """Store URLs map to their backends; an empty one is SQLite in the data dir."""
    assert open_store("memory://?max_mb=1", tmp_path).name == "memory"
    assert open_store("", tmp_path).name == "sqlite"
    assert open_store(f"sqlite:///{tmp_path}/c.db", tmp_path).name == "sqlite"
    with pytest.raises(ConfigError, match="max_mb"):
        open_store("memory://?max_mb=lots", tmp_path)


async def test_cache_put_writes_through_sqlite_batches_without_waiting(tmp_path: Path) -> None:
    """Cache.put (the MISS path) puts the entry in the hot tier at once and hands it to
    SQLite's next batch: it is in the file when that batch is written, and a second put of
    the same burst rides in the same batch."""
    path = tmp_path / "cache.db"
    store = SQLiteStore(path)
    await store.warm()
    cache = Cache(store, hot=MemoryStore())
    assert cache.put("v2:a", entry(10), 60)  # taken without waiting
    assert cache.put("v2:b", entry(20), 60)
    assert cache.peek("v2:a") is not None  # a duplicate arriving now is a HIT
    batch = store._next_batch
    assert batch is not None
    await asyncio.shield(batch)
    reader = SQLiteStore(path)  # another process's view: the file itself
    try:
        await reader.warm()
        got = await reader.get("v2:b")
        assert got is not None and got.body == b"x" * 20
    finally:
        await reader.aclose()
        await store.aclose()
    assert cache.write_errors == 0


async def test_cache_put_counts_a_failed_sqlite_batch_and_keeps_serving(tmp_path: Path) -> None:
    """A batch the file refuses (here a trigger standing for a full disk) is counted and
    logged as set() counts it; put() raises nothing and the breaker stays closed, so reads
    go on."""
    path = tmp_path / "cache.db"
    store = SQLiteStore(path)
    await store.warm()
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON entries "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    cache = Cache(store, hot=MemoryStore())
    cache.put("v2:a", entry(10), 60)
    batch = store._next_batch
    assert batch is not None
    with pytest.raises(StoreUnavailable):
        await asyncio.shield(batch)
    await asyncio.sleep(0)  # the batch's done callbacks run
    assert cache.write_errors == 1 and cache.healthy
    assert cache.peek("v2:a") is not None  # this process still answers it from the hot tier
    assert await cache.get("v2:missing") is None  # reads still go to the store
    await store.aclose()


async def test_a_full_sqlite_write_queue_refuses_writes_instead_of_growing(tmp_path: Path) -> None:
    """Writes queued while the file is behind are bounded by queue_max_bytes: past it a put is
    refused and counted as a failed write (the hot tier still has the answer); the queue
    takes writes again once its batch is written."""
    store = SQLiteStore(tmp_path / "cache.db")
    await store.warm()
    store.queue_max_bytes = 3_000
    cache = Cache(store, hot=MemoryStore())
    for i in range(5):  # 5 entries of about 1.3 KB each, while no batch has been written yet
        cache.put(f"v2:k{i}", entry(1000), 60)
    batch = store._next_batch
    assert batch is not None
    await asyncio.sleep(0)  # the refused writes' callbacks run
    assert cache.write_errors == 3 and cache.healthy
    assert all(cache.peek(f"v2:k{i}") is not None for i in range(5))
    await asyncio.shield(batch)
    await store.set("v2:later", entry(1000), 60)  # the queue drained: taken again
    assert (await store.get("v2:k1")) is not None and (await store.get("v2:k4")) is None
    await store.aclose()


OLD_SCHEMA = """
CREATE TABLE entries (
    key TEXT PRIMARY KEY, expires REAL NOT NULL, value BLOB NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, atime REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX entries_expires ON entries(expires);
CREATE TABLE vectors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, part TEXT NOT NULL, member TEXT NOT NULL,
    expires REAL NOT NULL, record BLOB NOT NULL
);
CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
CREATE TRIGGER entries_vectors AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - coalesce(
        (SELECT sum(length(record)) FROM vectors WHERE member = old.key), 0) WHERE id = 0;
    DELETE FROM vectors WHERE member = old.key;
END;
"""


async def test_a_store_of_an_earlier_version_is_converted_and_keeps_its_answers(
    tmp_path: Path,
) -> None:
    """A file whose entries table is WITHOUT ROWID (up to 0.1) is converted when opened: its
    answers, index records, byte total, expiry and index-record trigger all carry over."""
    path = tmp_path / "cache.db"
    later = time.time() + 600
    kept = CachedResponse(200, (("Content-Type", "application/json"),), b'{"a":1}', time.time())
    value = kept.to_bytes()
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
            ("v2:kept", later, value, len(value), time.time()),
        )
        db.execute("INSERT INTO entries VALUES ('v2:expired', 1.0, x'00', 1, 0)")
        db.execute(
            "INSERT INTO vectors(part, member, expires, record) VALUES ('p', 'v2:kept', ?, ?)",
            (later, b"r" * 10),
        )
        db.execute("INSERT INTO totals VALUES (0, ?)", (len(value) + 1 + 10,))
    store = SQLiteStore(path)
    await store.warm()
    try:
        got = await store.get("v2:kept")
        assert got is not None and got.body == b'{"a":1}' and got.headers == kept.headers
        assert await store.get("v2:expired") is None
        assert await store.total_bytes() == len(value) + 1 + 10
        with sqlite3.connect(path) as db:
            sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'entries'").fetchone()
            assert "WITHOUT ROWID" not in sql[0].upper()
            indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            assert {"entries_expires", "entries_atime", "entries_vectors"} <= indexes
        await store.delete("v2:kept")  # the trigger still takes its index records along
        assert await store.vectors_since("p", 0, 10) == []
        assert await store.total_bytes() == 1
        await store.set("v2:new", entry(5), 60)  # and writes go on
        assert await store.get("v2:new") is not None
    finally:
        await store.aclose()
    reopened = SQLiteStore(path)  # converted once: opening it again changes nothing
    await reopened.warm()
    try:
        assert await reopened.get("v2:new") is not None
    finally:
        await reopened.aclose()


async def test_a_batch_larger_than_one_insert_is_written_whole(tmp_path: Path) -> None:
    """A batch write goes in INSERT statements of ROWS_PER_INSERT rows: a batch of several
    of them, with a key written twice (the last write wins), is all in the file."""
    from proxy.stores.sqlite import ROWS_PER_INSERT

    store = SQLiteStore(tmp_path / "cache.db")
    await store.warm()
    try:
        n = ROWS_PER_INSERT * 2 + 3
        batches = {store.enqueue(f"v2:k{i}", entry(i + 1), 60) for i in range(n)}
        last = store.enqueue("v2:k0", entry(500), 60)
        assert batches == {last}  # one batch
        total = await asyncio.shield(last)
        with sqlite3.connect(tmp_path / "cache.db") as db:
            rows, size = db.execute("SELECT count(*), sum(size) FROM entries").fetchone()
        assert (rows, size) == (n, total)
        for i in range(1, n):
            got = await store.get(f"v2:k{i}")
            assert got is not None and len(got.body) == i + 1
        got = await store.get("v2:k0")
        assert got is not None and len(got.body) == 500
    finally:
        await store.aclose()


async def test_a_purge_or_delete_takes_answers_still_queued_for_the_file(tmp_path: Path) -> None:
    """Answers wait a few ms for their batch: a purge or delete made meanwhile waits for it,
    so the answer it removes is not written back after it."""
    store = SQLiteStore(tmp_path / "cache.db")
    await store.warm()
    try:
        store.enqueue("v2:t1.a", entry(5), 60)
        store.enqueue("v2:t2.b", entry(5), 60)
        assert await store.purge("v2:t1.*") == 1
        assert await store.get("v2:t1.a") is None and await store.get("v2:t2.b") is not None
        store.enqueue("v2:t3.c", entry(5), 60)
        await store.delete("v2:t3.c")
        await asyncio.sleep(0.05)
        assert await store.get("v2:t3.c") is None
    finally:
        await store.aclose()


async def test_batches_of_any_size_prepare_few_statements(tmp_path: Path) -> None:
    """Batches of 1 to 130 answers go in INSERTs of 64 rows and powers of two: at most
    seven statements are prepared (and kept by the sqlite3 module), whatever the sizes."""
    from proxy.stores.sqlite import _insert_sql

    store = SQLiteStore(tmp_path / "cache.db")
    await store.warm()
    try:
        _insert_sql.cache_clear()
        sizes = (1, 3, 5, 7, 9, 17, 33, 63, 64, 65, 100, 130)
        for size in sizes:
            await asyncio.gather(*(store.set(f"v2:{size}.{i}", entry(1), 60) for i in range(size)))
        assert 1 < _insert_sql.cache_info().currsize <= 7
        assert len(await store.keys()) == sum(sizes)
    finally:
        await store.aclose()


@given(st.lists(st.text(min_size=1, max_size=80), max_size=300))
def test_the_key_filter_never_forgets_a_key(keys: list[str]) -> None:
    """No false negatives, whatever the keys."""
    f = KeyFilter(len(keys))
    for k in keys:
        f.add(k)
    assert all(f.maybe(k) for k in keys)
    assert f.count == len(set(keys)) and not f.full  # a key added twice counts once


def test_the_key_filter_is_rarely_wrong_about_other_keys() -> None:
    """The key filter is wrong about unseen keys about 1 % of the time at capacity and fills up near
    it."""
    f = KeyFilter(10_000)
    for i in range(f.capacity):
        f.add(f"v2:t.a.b.c.{i:064x}")
    wrong = sum(f.maybe(f"v2:t.a.b.c.{i:064x}") for i in range(10**6, 10**6 + 20_000))
    assert wrong < 20_000 * 0.03  # about 1 % at capacity
    # full once it counts more keys than its capacity (a key whose bits were all set
    # already, about 1 % at capacity, does not count)
    assert f.capacity * 0.97 < f.count <= f.capacity  # so not full yet
    extra = 0
    while not f.full:
        f.add(f"more {extra}")
        extra += 1
    assert extra < f.capacity * 0.05


async def test_a_miss_needs_no_sqlite_lookup_and_other_processes_writes_are_followed(
    tmp_path: Path,
) -> None:
    """Once the key filter is loaded, a key never written is absent without asking SQLite;
    a key another process writes is read into it from the file, and then found; an
    Idempotency-Key is always looked up in the file, so a retry that reaches another worker
    finds it at once."""
    path = tmp_path / "cache.db"
    first = SQLiteStore(path)
    await first.set("v2:before", entry(3), 60)  # in the file before the other one starts
    store = SQLiteStore(path)
    await store.warm()
    other = SQLiteStore(path)  # another process's view of the same file
    await other.warm()
    try:
        await wait_until(lambda: store._filter is not None)
        assert store._filter is not None and store._filter.maybe("v2:before")
        assert store._absent("v2:never") and not store._filter.maybe("v2:never")
        assert await store.get("v2:before") is not None
        await other.set("v2:theirs", entry(4), 60)
        await other.set("idem:retry", entry(5), 60)
        assert await store.get("idem:retry") is not None  # the file is asked at once
        await wait_until(lambda: store._filter is not None and store._filter.maybe("v2:theirs"))
        got = await store.get("v2:theirs")
        assert got is not None and len(got.body) == 4
        store.enqueue("v2:mine", entry(6), 60)  # this process's own: in the filter at once
        assert store._filter.maybe("v2:mine")
    finally:
        await other.aclose()
        await store.aclose()
        await first.aclose()


async def test_a_full_key_filter_is_made_again_larger_with_every_key(tmp_path: Path) -> None:
    """When the filter is full it is loaded again from the file, sized for twice its keys,
    and keys queued meanwhile are not lost."""
    store = SQLiteStore(tmp_path / "cache.db")
    await store.warm()
    try:
        for i in range(50):
            await store.set(f"v2:k{i}", entry(1), 60)
        await wait_until(lambda: store._filter is not None)
        old = store._filter
        assert old is not None
        old.count = old.capacity + 1  # as if it had taken more keys than it was made for
        store.enqueue("v2:queued", entry(1), 60)
        await wait_until(lambda: store._filter is not old)
        new = store._filter
        assert new is not None and not new.full
        assert all(new.maybe(f"v2:k{i}") for i in range(50)) and new.maybe("v2:queued")
    finally:
        await store.aclose()


def test_a_key_added_again_is_not_counted_twice() -> None:
    """The store's own keys are added when queued and again when it reads the file after
    them: the filter fills at the rate of distinct keys."""
    f = KeyFilter(10)
    f.add("v2:a")
    f.add("v2:a")
    f.add("v2:b")
    assert f.count == 2


async def _clock_read_with(redis_server: RedisServer, script: list[object]) -> float:
    """CLOCK.offset after warm(), each Redis TIME reading done as `script` says: a number of
    seconds by which its answer comes back late, an exception to raise, or a (seconds,
    micros) answer in place of Redis's."""
    store = RedisStore.from_url(redis_server.url)
    real_time, steps = store.client.time, list(script)

    async def scripted() -> object:
        step = steps.pop(0) if steps else 0.0
        if isinstance(step, Exception):
            raise step
        if isinstance(step, tuple):
            return step
        got = await real_time()
        await asyncio.sleep(float(step))  # type: ignore[arg-type]
        return got

    store.client.time = scripted
    try:
        await store.warm()
        return CLOCK.offset
    finally:
        CLOCK.offset = 0.0
        await store.aclose()


async def test_the_redis_time_reading_with_the_shortest_round_trip_is_kept(
    redis_server: RedisServer,
) -> None:
    """Of five Redis TIME readings, four of them late (a stalled process), the quick one sets
    the clock: within a few ms of this machine's, whichever place it has."""
    for quick in range(5):
        script: list[object] = [0.3] * 5
        script[quick] = 0.0
        assert abs(await _clock_read_with(redis_server, script)) < 0.05, quick


async def test_a_failed_or_absurd_redis_time_keeps_the_readings_before_it(
    redis_server: RedisServer,
) -> None:
    """A reading that fails after good ones keeps the good ones' clock; a NaN or far-off
    answer is refused (this machine's clock, not NaN Ages)."""
    ahead = (int(time.time()) + 100, 0)  # a Redis whose clock is 100 s ahead
    assert 99 < await _clock_read_with(redis_server, [ahead, ahead, TimeoutError()]) < 101
    assert await _clock_read_with(redis_server, [(b"nan", b"0")]) == 0.0
    assert await _clock_read_with(redis_server, [(b"inf", b"0")]) == 0.0
    assert await _clock_read_with(redis_server, [(10**12, 0)]) == 0.0

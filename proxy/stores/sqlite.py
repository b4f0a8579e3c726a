"""Embedded on-disk store: SQLite in WAL mode, every call on one worker thread off the loop.

Bounded: the file and its WAL stay within `max_bytes` on disk (`sqlite:///path?max_mb=N`;
the default store in the data dir is capped at DEFAULT_MAX_MB): answers may use DATA_SHARE
of it, the WAL is checkpointed and truncated past WAL_SHARE, evictions free a bounded
number of bytes per transaction (secure delete writes them through the WAL), and an answer
larger than a tenth of the cap is not stored.
Past the cap the least recently used entries go, with their index records (a trigger);
expired entries and records go on a timer. Both run in batches of BATCH rows, each its own
short job on the store thread, so a lookup waits a few milliseconds at most behind them, and
the space they free is handed back to the file system (incremental vacuum).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from proxy.errors import StoreUnavailable
from proxy.models import CLOCK, CachedResponse, purged_fill
from proxy.stores.base import entry_of
from proxy.stores.keyfilter import KeyFilter
from proxy.tasks import spawn

log = structlog.get_logger()

T = TypeVar("T")

DEFAULT_MAX_MB = 1024.0
BATCH = 200
"""Rows deleted per job on the store thread (a few milliseconds)."""
ATIME_EVERY_S = 60.0
"""An entry's last-use time is written at most this often (a HIT is a read, not a write)."""
VACUUM_PAGES = 2000
PAUSE_S = 0.01
"""Between two batches of a sweep or an eviction: lookups get the store thread."""
DATA_SHARE = 0.75
"""Of the cap, what answers (and the pages holding them) may use; the rest is for the WAL
and the pages an eviction frees before they are given back: the cap is the disk budget."""
WAL_SHARE = 0.05
"""Of the cap, how large the WAL may grow before it is checkpointed and truncated (at least
WAL_MIN_BYTES; the default cap keeps SQLite's own 1000 pages)."""
WAL_MIN_BYTES = 256 * 1024
QUEUE_MAX_BYTES = 64 * 1024 * 1024
"""Most bytes of answers waiting for the next batch write: past it a write is refused
(counted and logged as a failed write), so a disk that stalls cannot grow the queue."""

PURGE_MEMORY_S = 3600.0
"""How long a purge is remembered in the file: longer than any fill may take."""
PURGES_KEPT = 256
"""Purges remembered in the file (the newest)."""


_ENTRIES = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    expires REAL NOT NULL,
    value BLOB NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime REAL NOT NULL DEFAULT 0
);
"""
"""Answers in a rowid table, appended in the order they are written, found through the index
on `key`; AUTOINCREMENT, so an id is never used twice and the key filter can follow the
table by id. (Up to 0.1 the key was the primary key of a WITHOUT ROWID table: every write then
put a whole answer at a random place in the table's B-tree, twice the work of appending it
and adding a short key to an index. Such a file is converted when it is opened.)"""
_SCHEMA = (
    _ENTRIES.format(name="entries")
    + """
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires);
CREATE TABLE IF NOT EXISTS vectors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    part TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS vectors_part ON vectors(part, seq);
CREATE INDEX IF NOT EXISTS vectors_member ON vectors(member);
CREATE INDEX IF NOT EXISTS vectors_expires ON vectors(expires);
CREATE TRIGGER IF NOT EXISTS entries_vectors AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - coalesce(
        (SELECT sum(length(record)) FROM vectors WHERE member = old.key), 0) WHERE id = 0;
    DELETE FROM vectors WHERE member = old.key;
END;
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals(id, bytes) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS purges (at REAL NOT NULL, pattern TEXT NOT NULL);
"""
)
_MIGRATE = (  # stores written by earlier versions: size and last use
    "ALTER TABLE entries ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE entries ADD COLUMN atime REAL NOT NULL DEFAULT 0",
)
_ATIME_INDEX = "CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime)"
WRITE_DELAY_S = 0.05
"""A batch is written this long after its first answer is queued (it is in the hot tier
meanwhile, so this process serves it; other processes see it that much later). Each
commit has a fixed cost (its WAL pages, the totals row), which one connection's MISSes
(about 20 a batch at 10 ms) paid for in latency: see docs/benchmarks.md, the MISS path."""
FOLLOW_EVERY_S = 0.05
"""How often the key filter reads the keys other processes wrote (see KeyFilter): another
worker's new answer is a HIT here that long after it is written, a MISS before."""
FOLLOW_RETRY_S = 1.0
"""After the key filter could not be read: the wait before it is loaded again."""
FOLLOW_ROWS = 20_000
"""Keys read per query while the key filter is loaded or catches up."""
ROWS_PER_INSERT = 64
"""Rows per INSERT statement of a batch write. One statement, not one per row
(executemany): the sqlite3 module gives up the GIL around every statement it steps and
must take it back after, and while the event loop is busy that wait is up to
sys.getswitchinterval() (5 ms), so a batch written row by row fell seconds behind under
load. Binding 64 rows holds the GIL for a few tens of microseconds."""


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int) -> str:
    """INSERT OR REPLACE of `rows` entries in one statement."""
    return "INSERT OR REPLACE INTO entries(key, expires, value, size, atime) VALUES " + ",".join(
        ["(?, ?, ?, ?, ?)"] * rows
    )


def _rowid_entries(db: sqlite3.Connection) -> None:
    """Convert an entries table of an earlier version (WITHOUT ROWID) to the rowid table, in
    one transaction, oldest use first; its indexes and trigger are made again."""
    if not _without_rowid(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _without_rowid(db):  # another process converted it meanwhile
            db.execute("ROLLBACK")
            return
        log.info("store.converting", store="sqlite", to="rowid table")
        db.execute(_ENTRIES.format(name="entries_rowid"))
        db.execute(
            "INSERT INTO entries_rowid(key, expires, value, size, atime) "
            "SELECT key, expires, value, size, atime FROM entries ORDER BY atime"
        )
        db.execute("DROP TABLE entries")  # its indexes and trigger too; no trigger fires
        db.execute("ALTER TABLE entries_rowid RENAME TO entries")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.executescript(_SCHEMA)


def _without_rowid(db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
    ).fetchone()
    return row is not None and "WITHOUT ROWID" in str(row[0]).upper()


class SQLiteStore:
    """Survives restarts; several worker processes may share the file (WAL, busy timeout)."""

    name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int | None = int(DEFAULT_MAX_MB * 1024 * 1024),
        sweep_every_s: float = 30.0,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        """None: no cap."""
        self.sweep_every_s = sweep_every_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._evicting = False
        self.evicted = 0
        self.expired = 0
        self._queue: list[tuple[str, CachedResponse, float]] = []
        """Entries waiting for the next batch write (serialised on the store thread, so a
        burst of answers holds no second copy of each, and the loop does not compress)."""
        self._queued_bytes = 0
        self.queue_max_bytes = QUEUE_MAX_BYTES
        self.data_cap: int | None = None
        self.wal_max = 0
        """Past this many bytes the WAL is checkpointed and truncated after a write (0: as
        SQLite does by itself)."""
        if max_bytes is not None:
            self.data_cap = int(max_bytes * DATA_SHARE)
            self.wal_max = max(WAL_MIN_BYTES, int(max_bytes * WAL_SHARE))
            # one batch may not take the file far past its cap before eviction runs
            self.queue_max_bytes = min(QUEUE_MAX_BYTES, max(1 << 20, max_bytes // 10))
        self._next_batch: asyncio.Future[int] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[int] | None = None
        """The batch being written (its items are out of the queue and not yet in the file)."""
        self._eviction: asyncio.Task[None] | None = None
        """Started by the writer when a batch takes the store over its cap."""
        self._ro: sqlite3.Connection | None = None
        self._filter: KeyFilter | None = None
        """Every key in the file (and queued for it), once loaded: a key it has never seen
        is absent without asking SQLite. None: not loaded (or its reading failed)."""
        self._loading: KeyFilter | None = None
        """A filter being filled from the file: keys queued meanwhile go into it too."""
        self._followed = 0
        """The highest entries.id the filter has read."""
        self._follower: asyncio.Task[None] | None = None
        self._ro_uri = ""
        self._ro_mapped = False
        """A read-only connection the event loop asks whether a key is there at all (an index
        lookup that never waits: busy timeout 0), so a MISS costs no thread hop."""

    # -- on the store thread ---------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
            new = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if new:  # only a file without tables can switch to incremental vacuum
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if self.wal_max:
                page = int(db.execute("PRAGMA page_size").fetchone()[0])
                db.execute(f"PRAGMA journal_size_limit={self.wal_max}")
                db.execute(f"PRAGMA wal_autocheckpoint={max(16, min(1000, self.wal_max // page))}")
            columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
            if columns and "size" not in columns:
                with db:
                    for stmt in _MIGRATE:
                        db.execute(stmt)
                    db.execute("UPDATE entries SET size = length(value)")
            db.executescript(_SCHEMA)
            _rowid_entries(db)
            db.execute(_ATIME_INDEX)
            if columns and "size" not in columns:
                with db:
                    total = db.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()
                    db.execute("UPDATE totals SET bytes = ? WHERE id = 0", (total[0],))
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _get(self, key: str) -> bytes | None:
        db = self._connect()
        row = db.execute(
            "SELECT value, expires, atime FROM entries WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        now = time.time()
        if row[1] < now:
            return None
        if now - row[2] > ATIME_EVERY_S:
            with db:
                db.execute("UPDATE entries SET atime = ? WHERE key = ?", (now, key))
        return bytes(row[0])

    def _get_many(self, keys: list[str]) -> list[bytes | None]:
        """_get for many keys in one trip to the store thread (SELECT ... IN, by 500)."""
        db = self._connect()
        now = time.time()
        found: dict[str, bytes] = {}
        stale: list[str] = []
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = db.execute(
                f"SELECT key, value, expires, atime FROM entries WHERE key IN ({marks})", part
            ).fetchall()
            for key, value, expires, atime in rows:
                if expires >= now:
                    found[key] = bytes(value)
                    if now - atime > ATIME_EVERY_S:
                        stale.append(key)
        if stale:
            with db:
                db.executemany(
                    "UPDATE entries SET atime = ? WHERE key = ?", [(now, k) for k in stale]
                )
        return [found.get(k) for k in keys]

    def _set_many(self, items: list[tuple[str, CachedResponse, float]]) -> tuple[int, int]:
        """Write a batch of entries in one transaction; the store's total bytes after it, and
        what counts against the cap (see _size).
        Serialised ROWS_PER_INSERT at a time, so a burst holds no second copy of its answers."""
        db = self._connect()
        now = time.time()
        newest = {key: (entry, expires) for key, entry, expires in items}  # last write wins
        purges = db.execute("SELECT at, pattern FROM purges").fetchall()
        if purges:  # a purge by any process sharing the file keeps out fills begun before it
            newest = {
                key: (entry, expires)
                for key, (entry, expires) in newest.items()
                if not purged_fill(key, entry, purges)
            }
        keys = list(newest)
        delta = 0
        with db:
            start = 0
            while start < len(keys):
                # 64 rows at a time, the rest in powers of two: seven statements at most to
                # prepare and keep (a statement of n rows is a program of its own, and the
                # sqlite3 module keeps the last 128 it prepared)
                left = len(keys) - start
                size = min(ROWS_PER_INSERT, 1 << (left.bit_length() - 1))
                group, start = keys[start : start + size], start + size
                marks = ",".join("?" * len(group))
                delta -= db.execute(  # the sizes these rows replace
                    f"SELECT coalesce(sum(size), 0) FROM entries WHERE key IN ({marks})", group
                ).fetchone()[0]
                params: list[object] = []
                for key in group:
                    entry, expires = newest[key]
                    value = entry.to_bytes()
                    delta += len(value)
                    params += (key, expires, value, len(value), now)
                db.execute(_insert_sql(len(group)), params)
            db.execute("UPDATE totals SET bytes = bytes + ? WHERE id = 0", (delta,))
        self._trim_wal(db)
        return int(db.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0]), self._size(
            db
        )

    def _size(self, db: sqlite3.Connection) -> int:
        """What counts against the cap: the answers' bytes, or the pages in use if more
        (keys, indexes and half-full pages)."""
        data = int(db.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])
        if self.max_bytes is None:
            return data
        pages = db.execute(
            "SELECT (SELECT page_count FROM pragma_page_count()) - "
            "(SELECT freelist_count FROM pragma_freelist_count()), "
            "(SELECT page_size FROM pragma_page_size())"
        ).fetchone()
        return max(data, int(pages[0]) * int(pages[1]))

    def _trim_wal(self, db: sqlite3.Connection) -> None:
        """Checkpoint and truncate the WAL once it is past wal_max (waiting at most 100 ms
        for readers: a checkpoint that cannot finish now is tried after the next write)."""
        if not self.wal_max:
            return
        try:
            wal = os.path.getsize(f"{self.path}-wal")
        except OSError:
            return
        if wal > self.wal_max:
            db.execute("PRAGMA busy_timeout=100")
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                db.execute("PRAGMA busy_timeout=5000")

    def _delete(self, key: str) -> None:
        db = self._connect()
        with db:
            row = db.execute("DELETE FROM entries WHERE key = ? RETURNING size", (key,)).fetchone()
            if row is not None:
                db.execute("UPDATE totals SET bytes = bytes - ? WHERE id = 0", (row[0],))

    def _delete_batch(self, where: str, order: str, args: tuple[Any, ...]) -> tuple[int, int]:
        """Delete up to BATCH rows chosen by `where`/`order`; (rows, bytes left in the store)."""
        db = self._connect()
        with db:
            if self.wal_max:
                # SQLite's secure delete writes zeros over every freed page, through the WAL:
                # a batch frees at most half the WAL's budget, so the WAL stays in the cap
                picked: list[str] = []
                taken = 0
                for key, size in db.execute(
                    f"SELECT key, size FROM entries {where} {order} LIMIT {BATCH}", args
                ):
                    if picked and taken + size > self.wal_max // 2:
                        break
                    picked.append(key)
                    taken += size
                marks = ",".join("?" * len(picked))
                rows = db.execute(
                    f"DELETE FROM entries WHERE key IN ({marks}) RETURNING size", picked
                ).fetchall()
            else:
                rows = db.execute(
                    # fixed SQL from this module, arguments bound
                    f"DELETE FROM entries WHERE key IN "
                    f"(SELECT key FROM entries {where} {order} LIMIT {BATCH}) RETURNING size",
                    args,
                ).fetchall()
            freed = sum(r[0] for r in rows)
            if freed:
                db.execute("UPDATE totals SET bytes = bytes - ? WHERE id = 0", (freed,))
        self._trim_wal(db)
        return len(rows), self._size(db)

    def _vadd(self, part: str, member: str, record: bytes, expires: float, keep: int) -> int:
        """Add one index record (it counts against the cap, like answers); what counts
        against the cap after."""
        db = self._connect()
        with db:
            if db.execute("SELECT 1 FROM entries WHERE key = ?", (member,)).fetchone() is None:
                return self._used()  # its entry went already (evicted, purged)
            freed = db.execute(
                "DELETE FROM vectors WHERE member = ? RETURNING length(record)", (member,)
            ).fetchall()
            seq = db.execute(
                "INSERT INTO vectors(part, member, expires, record) VALUES (?, ?, ?, ?)",
                (part, member, expires, record),
            ).lastrowid
            if seq is not None and seq % 64 == 0:  # now and then: keep the newest `keep`
                freed += db.execute(
                    "DELETE FROM vectors WHERE part = ? AND seq <= (SELECT seq FROM vectors "
                    "WHERE part = ? ORDER BY seq DESC LIMIT 1 OFFSET ?) RETURNING length(record)",
                    (part, part, keep),
                ).fetchall()
            delta = len(record) - sum(r[0] for r in freed)
            db.execute("UPDATE totals SET bytes = bytes + ? WHERE id = 0", (delta,))
        return self._used()

    def _vsince(self, part: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        # by (part, seq) only: an `expires` test here lets the planner pick the expires index
        # and read every live row (expired ones are masked in the search, and swept)
        rows = self._connect().execute(
            "SELECT seq, record FROM vectors INDEXED BY vectors_part WHERE part = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (part, after, limit),
        )
        return [(int(seq), bytes(record)) for seq, record in rows]

    def _vsweep(self, now: float) -> int:
        """Delete up to BATCH expired index records; how many went."""
        db = self._connect()
        with db:
            freed = db.execute(
                "DELETE FROM vectors WHERE seq IN "
                f"(SELECT seq FROM vectors WHERE expires < ? LIMIT {BATCH}) "
                "RETURNING length(record)",
                (now,),
            ).fetchall()
            db.execute(
                "UPDATE totals SET bytes = bytes - ? WHERE id = 0", (sum(r[0] for r in freed),)
            )
        return len(freed)

    def _vacuum(self) -> int:
        """Give up to VACUUM_PAGES free pages back to the file system; the free pages left."""
        db = self._connect()
        pages = VACUUM_PAGES
        if self.wal_max:  # pages moved to the freed places are written to the WAL first
            pages = max(16, min(pages, self.wal_max // 2 // 4096))
        # executescript steps the pragma to its end: execute() would free one page a call
        db.executescript(f"PRAGMA incremental_vacuum({pages});")
        self._trim_wal(db)
        return int(db.execute("PRAGMA freelist_count").fetchone()[0])

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _keys(self) -> list[str]:
        return [r[0] for r in self._connect().execute("SELECT key FROM entries")]

    def _total(self) -> int:
        return int(self._connect().execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])

    def _used(self) -> int:
        return self._size(self._connect())

    # -- on the loop ------------------------------------------------------------------------
    async def warm(self) -> None:
        """Open the file and start the expiry sweeper (called once at start-up)."""
        await self._run(self._connect)
        self._ro_uri = await self._run(lambda: self.path.resolve().as_uri() + "?mode=ro")
        if self._ro is None:
            try:
                self._ro = sqlite3.connect(
                    self._ro_uri,
                    uri=True,
                    timeout=0,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:  # every lookup then goes to the store thread
                log.info("store.readonly_unavailable", store=self.name, error=str(exc)[:200])
        if self._sweeper is None:
            self._sweeper = spawn(self._sweep_forever(), name="sqlite-sweeper")
        if self._follower is None:
            self._follower = spawn(self._follow_keys(), name="sqlite-keys")

    def _absent(self, key: str) -> bool:
        """Is the key surely absent or expired? Asked on the loop: first the key filter (no
        I/O), then an index lookup that never waits; False when unsure (the store thread
        then reads it). An Idempotency-Key is always looked up in the file: a retry that
        reaches another worker must find the first answer."""
        keys = self._filter
        if keys is not None and not keys.maybe(key) and not key.startswith("idem:"):
            return True
        if self._ro is None:
            return False
        try:
            if not self._ro_mapped:
                # pages through a memory map: no copy per lookup, and a write by the store
                # thread does not make every later lookup re-read its pages
                self._ro.execute("PRAGMA mmap_size = 268435456")
                self._ro_mapped = True
            row = self._ro.execute("SELECT expires FROM entries WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return False  # busy (a checkpoint, another process): ask the store thread
        return row is None or bool(row[0] < time.time())

    def _claim(self, name: str, value: bytes) -> bytes:
        db = self._connect()
        with db:
            db.execute("INSERT OR IGNORE INTO meta(name, value) VALUES (?, ?)", (name, value))
        row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row is not None else b""

    async def claim(self, name: str, value: bytes) -> bytes:
        """Set `name` to `value` unless it is set (INSERT OR IGNORE, one transaction); what it
        holds after."""
        got: bytes = await self._run(self._claim, name, value)
        return got

    def _ping(self) -> None:
        self._connect().execute("SELECT count(*) FROM totals").fetchone()

    async def ping(self) -> None:
        """StoreUnavailable unless the file can be opened and read."""
        await self._run(self._ping)

    async def get(self, key: str) -> CachedResponse | None:
        if self._absent(key):
            return None
        raw = await self._run(self._get, key)
        return await entry_of(self, key, raw)

    async def get_many(self, keys: list[str]) -> list[CachedResponse | None]:
        """get() for many keys: the key filter on the loop, the rest in one store trip."""
        ask = [k for k in keys if not self._absent(k)]
        raws = await self._run(self._get_many, ask) if ask else []
        found = dict(zip(ask, raws, strict=True))
        return [await entry_of(self, key, found.get(key)) for key in keys]

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        """Queue the entry for the next batch and wait until it is written; StoreUnavailable
        if that batch failed."""
        await asyncio.shield(self.enqueue(key, entry, ttl_s))
        eviction = self._eviction
        if eviction is not None:  # that batch took the store over its cap
            await asyncio.shield(eviction)

    def enqueue(self, key: str, entry: CachedResponse, ttl_s: float) -> asyncio.Future[int]:
        """Queue the entry for the next batch (group commit: the writes that arrive within
        WRITE_DELAY_S, or while a batch is written, go in one transaction and one job after
        it); that batch's future, the store's total bytes after it or StoreUnavailable.
        An entry larger than a tenth of the cap is not stored (its write and its eviction
        would take the file past the cap)."""
        if self.max_bytes is not None and entry.size > self.max_bytes // 10:
            skipped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            skipped.set_result(0)
            return skipped
        if self._queue and self._queued_bytes + entry.size > self.queue_max_bytes:
            # the file is far behind (a stalled disk): refuse rather than hold every answer
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(StoreUnavailable("sqlite: the write queue is full"))
            return refused
        self._queue.append((key, entry, time.time() + ttl_s))
        self._queued_bytes += entry.size
        for keys in (self._filter, self._loading):
            if keys is not None:
                keys.add(key)
        batch = self._next_batch
        if batch is None:
            batch = self._next_batch = asyncio.get_running_loop().create_future()
        if self._writer is None:
            self._writer = spawn(self._write_batches(), name="sqlite-writer")
        return batch

    async def _write_batches(self) -> None:
        try:
            while self._queue:
                # gather what arrives in the next few ms: at a few requests at a time, a batch
                # of one answer costs three times what it does in a batch of thirty
                await asyncio.sleep(WRITE_DELAY_S)
                items, self._queue = self._queue, []
                self._queued_bytes = 0
                batch, self._next_batch = self._next_batch, None
                assert batch is not None
                self._writing = batch
                try:
                    total, used = await self._run(self._set_many, items)
                except StoreUnavailable as exc:
                    batch.set_exception(exc)
                    batch.exception()  # retrieved: its writers may all have gone
                    continue
                finally:
                    self._writing = None
                batch.set_result(total)
                over = self.data_cap is not None and used > self.data_cap
                if over and not self._evicting and self._eviction is None:
                    self._eviction = spawn(self._over_cap(used), name="sqlite-evict")
                    self._eviction.add_done_callback(self._evicted)
        finally:
            self._writer = None

    def _key_rows(self, after: int) -> list[tuple[int, str]]:
        rows = self._connect().execute(
            "SELECT id, key FROM entries WHERE id > ? ORDER BY id LIMIT ?", (after, FOLLOW_ROWS)
        )
        return [(int(i), str(k)) for i, k in rows]

    async def _load_keys(self) -> None:
        """A new filter of every key in the file, sized for twice as many, in place of the
        current one. Keys queued from the start go into it as well, and what was queued
        before is written first, so the new filter misses nothing."""
        count = int(
            await self._run(
                lambda: self._connect().execute("SELECT count(*) FROM entries").fetchone()[0]
            )
        )
        fresh = self._loading = KeyFilter(2 * count)
        try:
            await self._settled()
            after = 0
            while True:
                rows = await self._run(self._key_rows, after)
                for i, key in rows:
                    fresh.add(key)
                    after = i
                if len(rows) < FOLLOW_ROWS:
                    break
            self._filter, self._followed = fresh, after
        finally:
            self._loading = None

    async def _follow_keys(self) -> None:
        """Load the key filter, then read what other processes write every FOLLOW_EVERY_S
        (this process's own writes are in it from the moment they are queued); make a larger
        one when it is full. While it is not loaded, lookups ask SQLite."""
        while True:
            try:
                if self._filter is None or self._filter.full:
                    await self._load_keys()
                else:
                    rows = await self._run(self._key_rows, self._followed)
                    keys = self._filter
                    for i, key in rows:
                        keys.add(key)
                        self._followed = i
                    if len(rows) == FOLLOW_ROWS:
                        continue  # far behind: read on at once
            except Exception as exc:  # the file, or a bug: fail safe, every lookup asks SQLite
                if self._filter is not None or not isinstance(exc, StoreUnavailable):
                    log.warning(
                        "store.keys_unavailable",
                        store=self.name,
                        error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    )
                self._filter = None
                await asyncio.sleep(FOLLOW_RETRY_S)
            await asyncio.sleep(FOLLOW_EVERY_S)

    async def _settled(self) -> None:
        """Wait until every answer queued so far is in the file (or its batch failed), so
        that a delete or purge is not undone by a write queued before it."""
        for batch in (self._writing, self._next_batch):
            if batch is not None:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(batch)

    def _evicted(self, _: asyncio.Task[None]) -> None:
        self._eviction = None

    async def _over_cap(self, total: int) -> None:
        if self.data_cap is not None and total > self.data_cap and not self._evicting:
            self._evicting = True
            try:
                await self._evict()
            finally:
                self._evicting = False

    async def _evict(self) -> None:
        """Least recently used entries go, a batch per job, until the store is under its
        share of the cap (with a tenth of headroom, so eviction does not run on every write)."""
        assert self.data_cap is not None
        target = int(self.data_cap * 0.9)
        total = await self._run(self._used)
        while total > target:
            n, total = await self._run(self._delete_batch, "", "ORDER BY atime", ())
            self.evicted += n
            if n == 0:
                break
            await asyncio.sleep(PAUSE_S)
        await self._vacuum_all()

    async def sweep(self) -> int:
        """Delete every expired entry, a batch per job with a pause between batches (lookups
        run in between and the sweep takes at most about half of the store thread); then give
        the freed pages back to the file system. Returns how many entries went."""
        now = time.time()
        gone = await self._delete_all("WHERE expires < ?", (now,))
        self.expired += gone
        while True:  # semantic index records, a batch per job
            n = await self._run(self._vsweep, now)
            if n < BATCH:
                break
            await asyncio.sleep(PAUSE_S)
        return gone

    async def _delete_all(self, where: str, args: tuple[Any, ...]) -> int:
        """Delete every row `where` selects, BATCH rows a job with PAUSE_S between jobs, then
        vacuum; how many rows went."""
        gone = 0
        while True:
            n, _ = await self._run(self._delete_batch, where, "", args)
            gone += int(n)
            if n == 0 or (n < BATCH and not self.wal_max):  # (capped: batches by bytes)
                break
            await asyncio.sleep(PAUSE_S)
        if gone:
            await self._vacuum_all()
        return gone

    async def _vacuum_all(self) -> None:
        """Vacuum step by step while steps make progress (in WAL mode a few free pages can
        stay until a checkpoint)."""
        left = await self._run(self._vacuum)
        while left:
            await asyncio.sleep(PAUSE_S)
            before, left = left, await self._run(self._vacuum)
            if left >= before:
                break

    async def _sweep_forever(self) -> None:
        delay = min(1.0, self.sweep_every_s)  # the first sweep soon after start-up
        while True:
            await asyncio.sleep(delay)
            delay = self.sweep_every_s
            t0 = time.monotonic()
            try:
                gone = await self.sweep()
            except StoreUnavailable as exc:
                log.warning("store.sweep_failed", store=self.name, error=str(exc)[:200])
                continue
            if gone:
                took = round((time.monotonic() - t0) * 1000.0, 1)
                log.info("store.swept", store=self.name, expired=gone, ms=took)

    async def delete(self, key: str) -> None:
        await self._settled()
        await self._run(self._delete, key)

    async def purge(self, pattern: str) -> int:
        """Delete every entry whose key matches the glob `pattern`, a batch per job with pauses
        (a tenant's keys share a prefix, which the primary key index finds); how many went.
        Their semantic index records go with them (a trigger); so do answers still queued
        for the file when the purge began."""
        await self._settled()
        await self._run(self._note_purge, pattern)  # first: see _set_many
        return await self._delete_all("WHERE key GLOB ?", (pattern,))

    def _note_purge(self, pattern: str) -> None:
        """Log a purge in the file for an hour, so that every process sharing it keeps out the
        answers whose fill began before it (a batch written after this sees it; one written
        before is deleted by the purge that follows)."""
        db = self._connect()
        now = CLOCK.now()
        with db:
            db.execute("DELETE FROM purges WHERE at < ?", (now - PURGE_MEMORY_S,))
            db.execute("INSERT INTO purges(at, pattern) VALUES (?, ?)", (now, pattern))
            db.execute(
                "DELETE FROM purges WHERE rowid NOT IN "
                "(SELECT rowid FROM purges ORDER BY at DESC LIMIT ?)",
                (PURGES_KEPT,),
            )

    async def vectors_add(
        self, part: str, member: str, record: bytes, expires: float, keep: int
    ) -> None:
        used = await self._run(self._vadd, part, member, record, expires, keep)
        await self._over_cap(used)

    async def vectors_since(self, part: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows: list[tuple[int, bytes]] = await self._run(self._vsince, part, after, limit)
        return rows

    async def total_bytes(self) -> int:
        """Bytes of answers held (what the cap counts)."""
        total: int = await self._run(self._total)
        return total

    async def keys(self) -> list[str]:
        """Every stored key (for maintenance commands such as images backfill)."""
        result: list[str] = await self._run(self._keys)
        return result

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._follower is not None:
            self._follower.cancel()
        if self._writer is not None:  # the last batch is written before the file closes
            await asyncio.shield(self._writer)
        if self._ro is not None:
            self._ro.close()
            self._ro = None
        try:
            await self._run(self._close)
        finally:
            self._pool.shutdown(wait=False)  # _close ran on it already: nothing is left

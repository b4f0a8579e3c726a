"""Embedded on-disk store: SQLite in WAL mode, every call on one worker thread off the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from proxy.errors import StoreUnavailable
from proxy.models import CachedResponse, CorruptEntry

log = structlog.get_logger()

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires);
"""


class SQLiteStore:
    """Survives restarts; several worker processes may share the file (WAL, busy timeout)."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._writes = 0

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _get(self, key: str) -> bytes | None:
        row = (
            self._connect()
            .execute("SELECT value, expires FROM entries WHERE key = ?", (key,))
            .fetchone()
        )
        if row is None:
            return None
        if row[1] < time.time():
            return None
        return bytes(row[0])

    def _set(self, key: str, value: bytes, expires: float) -> None:
        db = self._connect()
        with db:
            db.execute(
                "INSERT OR REPLACE INTO entries(key, expires, value) VALUES (?, ?, ?)",
                (key, expires, value),
            )
            self._writes += 1
            if self._writes % 1000 == 0:
                db.execute("DELETE FROM entries WHERE expires < ?", (time.time(),))

    def _delete(self, key: str) -> None:
        db = self._connect()
        with db:
            db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _keys(self) -> list[str]:
        return [r[0] for r in self._connect().execute("SELECT key FROM entries")]

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self._run(self._get, key)
        if raw is None:
            return None
        try:
            return CachedResponse.from_bytes(raw)
        except CorruptEntry as exc:
            log.warning("store.corrupt_entry", store=self.name, key=key[3:15], error=str(exc))
            await self.delete(key)
            return None

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        await self._run(self._set, key, entry.to_bytes(), time.time() + ttl_s)

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)

    async def keys(self) -> list[str]:
        """Every stored key (for maintenance commands such as images backfill)."""
        result: list[str] = await self._run(self._keys)
        return result

    async def aclose(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._pool.shutdown(wait=False)  # _close ran on it already: nothing is left

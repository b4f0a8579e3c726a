"""The store as the data path sees it: failures open a breaker and the proxy degrades.

A small in-process hot tier (an LRU bounded by bytes) sits in front of a store that lives
outside the process (SQLite, Redis): a HIT on a hot entry costs no thread hop or round trip.
Its entries live `hot_ttl_s` at most, so an entry replaced or expired in the shared store is
served by another process for that long at most.

A failing store never fails a request: stores raise StoreUnavailable for their connection and
timeout errors (a damaged entry is a MISS inside the store, and a bug is not an outage);
`get`/`set` pass it on, which the handler
turns into a pass-through (BYPASS), and after a failure the store is not tried again for
`breaker_s`. One `store.unavailable` / `store.recovered` line is logged per state change.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, cast

import structlog

from proxy.errors import StoreUnavailable
from proxy.models import CLOCK, CachedResponse, purged_fill
from proxy.stores import MemoryStore, Store
from proxy.stores.base import Enqueues

log = structlog.get_logger()

PURGES_KEPT = 256
"""Purges remembered (pattern, when) to keep fills begun before them from storing."""
PURGE_MEMORY_S = 3600.0
"""How long a purge is remembered: longer than any fill may take (upstream timeouts)."""


class Cache:
    def __init__(
        self,
        store: Store,
        *,
        breaker_s: float = 5.0,
        hot: MemoryStore | None = None,
        hot_ttl_s: float = 5.0,
    ) -> None:
        self.store = store
        self.hot = hot
        self.in_memory = hot is store
        """The store is the in-process memory store: peek() is the whole lookup."""
        self.hot_ttl_s = hot_ttl_s
        self.breaker_s = breaker_s
        self.open_until = 0.0
        self.healthy = True
        self.reason = ""
        """Why the store is degraded (the last failure), for /_proxy/health."""
        self.notes: list[str] = []
        """What else an operator should know, shown in health's warnings (few, fixed)."""
        self.write_errors = 0
        """Writes skipped because the store refused them (reads went on)."""
        self._write_logged = -1e9
        self._enqueue = store.enqueue if isinstance(store, Enqueues) else None
        """The store's write without waiting (see put), where it has one."""
        self._purges: deque[tuple[float, str]] = deque(maxlen=PURGES_KEPT)
        """(when, pattern) of the latest purges made through this process (see purged)."""

    @property
    def state(self) -> str:
        return "ok" if self.healthy else "degraded"

    def _check(self) -> None:
        if not self.healthy and time.monotonic() < self.open_until:
            raise StoreUnavailable("breaker open")

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        self.reason = str(exc)[:200]
        if self.healthy:
            log.warning("store.unavailable", store=self.store.name, error=self.reason)
        self.healthy = False
        self.open_until = time.monotonic() + self.breaker_s
        return StoreUnavailable(str(exc))

    def _ok(self) -> None:
        if not self.healthy:
            self.healthy = True
            self.reason = ""
            log.info("store.recovered", store=self.store.name)

    async def probe(self) -> None:
        """Ask the store whether it answers (PING, SELECT 1), without waiting for traffic:
        health tells the truth at start-up and while idle; a store back up closes the
        breaker at once."""
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return
        try:
            await ping()
        except StoreUnavailable as exc:
            self._failed(exc)
            return
        self.open_until = 0.0
        self._ok()

    def peek(self, key: str) -> CachedResponse | None:
        """The hot tier only, without a coroutine: the cheapest possible HIT."""
        hot = self.hot
        return hot.peek(key) if hot is not None else None

    async def get(self, key: str) -> CachedResponse | None:
        hot = self.hot
        if hot is not None:
            entry = hot.peek(key)
            if entry is not None or hot is self.store:
                return entry
        self._check()
        try:
            entry = await self.store.get(key)
        except StoreUnavailable as exc:  # only an outage opens the breaker, never a bug
            raise self._failed(exc) from exc
        if not self.healthy:
            self._ok()
        if entry is not None and hot is not None:
            hot.put(key, entry, self.hot_ttl_s)
        return entry

    async def get_many(self, keys: list[str]) -> list[CachedResponse | None]:
        """get() for many keys (embeddings items): the hot tier, then one batch read from a
        store that has one (SQLite, Redis), else a read per key."""
        hot = self.hot
        out: list[CachedResponse | None] = [None] * len(keys)
        ask: list[int] = []
        for i, key in enumerate(keys):
            entry = hot.peek(key) if hot is not None else None
            if entry is not None:
                out[i] = entry
            elif hot is not self.store:
                ask.append(i)
        if not ask:
            return out
        self._check()
        names = [keys[i] for i in ask]
        many = getattr(self.store, "get_many", None)
        try:
            if many is not None:
                found: list[CachedResponse | None] = await many(names)
            else:
                found = list(await asyncio.gather(*(self.store.get(k) for k in names)))
        except StoreUnavailable as exc:
            raise self._failed(exc) from exc
        if not self.healthy:
            self._ok()
        for i, entry in zip(ask, found, strict=True):
            out[i] = entry
            if entry is not None and hot is not None:
                hot.put(keys[i], entry, self.hot_ttl_s)
        return out

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        """Store an answer. A failed write (disk full, Redis at maxmemory with noeviction) is
        skipped and counted, and never opens the breaker: reads go on for every tenant; only a
        failed read (the store is really gone) switches caching off. An answer whose fill
        began before a purge that names its key is not stored (see purged)."""
        if self._purges and self.purged(key, entry):
            return
        if self.hot is self.store:
            await self.store.set(key, entry, ttl_s)
            return
        if self.hot is not None:
            self.hot.put(key, entry, min(ttl_s, self.hot_ttl_s))
        self._check()
        try:
            await self.store.set(key, entry, ttl_s)
        except StoreUnavailable as exc:
            self._write_failed(exc)
            raise

    async def delete(self, key: str, entry: CachedResponse) -> None:
        """Drop a damaged entry (one that cannot become the answer asked for), unless another
        answer replaced it meanwhile; a store that fails the delete is left as it is."""
        hot = self.hot
        if hot is not None:
            held = hot.peek(key)
            if held is not None and held.created != entry.created:
                return
            await hot.delete(key)
            if hot is self.store:
                return
        try:
            self._check()
            await self.store.delete(key)
        except StoreUnavailable:
            pass

    def put(self, key: str, entry: CachedResponse, ttl_s: float) -> bool:
        """set() without waiting, where the store takes writes so (memory, SQLite's batches):
        the entry is in the hot tier at once (so a duplicate that comes next is a HIT) and
        goes to the store with the next batch. A failed batch is counted and logged as set()
        does; nothing raises here. False, with nothing done, for a store that does not take
        writes without waiting (Redis): set() it then."""
        store = self.store
        if self.hot is not store and self._enqueue is None:
            return False
        if self._purges and self.purged(key, entry):
            return True
        if self.hot is store:
            self.hot.put(key, entry, ttl_s)
            return True
        assert self._enqueue is not None
        if self.hot is not None:
            self.hot.put(key, entry, min(ttl_s, self.hot_ttl_s))
        if not self.healthy and time.monotonic() < self.open_until:
            return True  # breaker open: skipped, as set() skips it
        self._enqueue(key, entry, ttl_s).add_done_callback(self._written)
        return True

    def _written(self, batch: asyncio.Future[Any]) -> None:
        if not batch.cancelled() and isinstance(batch.exception(), StoreUnavailable):
            self._write_failed(cast(StoreUnavailable, batch.exception()))

    def _write_failed(self, exc: StoreUnavailable) -> None:
        self.write_errors += 1
        now = time.monotonic()
        if now - self._write_logged > 10.0:  # one line per burst, not one per write
            self._write_logged = now
            log.warning(
                "store.write_failed",
                store=self.store.name,
                error=str(exc)[:200],
                skipped=self.write_errors,
            )

    async def purge(self, *patterns: str) -> int:
        """Delete from the store (and this process's hot tier) every entry whose key matches
        one of `patterns` (see purge.patterns_of), and keep every fill that began before now
        from storing under them. Other processes' hot tiers let go of them within hot_ttl_s.
        Raises StoreUnavailable."""
        now = CLOCK.now()
        while self._purges and self._purges[0][0] < now - PURGE_MEMORY_S:
            self._purges.popleft()
        for pattern in patterns:
            self._purges.append((now, pattern))
        gone = 0
        for pattern in patterns:
            if self.hot is not None and self.hot is not self.store:
                self.hot.purge_now(pattern)
            purge = getattr(self.store, "purge", None)
            if purge is not None:
                gone += await purge(pattern)
        return gone

    def purged(self, key: str, entry: CachedResponse) -> bool:
        """Did a purge made through this process name `key` after the fill of `entry` began
        (models.purged_fill)?"""
        return purged_fill(key, entry, self._purges)

    async def warm(self) -> None:
        """Connect to the store before the first request, if it has anything to warm; a store
        that cannot be reached starts out degraded (the breaker open) instead of failing."""
        warm = getattr(self.store, "warm", None)
        if warm is None:
            return
        try:
            await warm()
        except StoreUnavailable as exc:
            self._failed(exc)  # start degraded; the breaker tries again after breaker_s

    @property
    def warnings(self) -> list[str]:
        found = getattr(self.store, "warnings", None)
        return [*(found or ()), *self.notes]

    async def aclose(self) -> None:
        await self.store.aclose()

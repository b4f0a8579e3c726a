"""Redis store: shared by every instance; entries always carry a TTL; values hold no secret.

Keys are `{prefix}:resp:{key}` where the key is already an HMAC, so nothing in Redis names a
tenant or a credential. Calls have short timeouts; the Cache breaker above turns failures
into pass-through. `redis+cluster://host:port` talks to a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.errors import ConfigError, StoreUnavailable
from proxy.keys import is_partition
from proxy.models import CLOCK, CachedResponse, purged_fill
from proxy.stores.base import entry_of

log = structlog.get_logger()
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 0.5
SEQ_MASK = (1 << 22) - 1
"""A stream id `ms-seq` as one int: ms << 22 | seq (the semantic index's sequence numbers)."""


def _driver_info() -> dict[str, Any]:
    """The client's CLIENT SETINFO data, built once here: left to redis-py, it reads package
    metadata from disk for every new connection, on the event loop."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7
        return {"lib_version": redis.__version__}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


RACES = (AttributeError, RuntimeError, TypeError, IndexError, KeyError)
"""What redis-py's async cluster client raises when coroutines race over its connections
and topology (seen on cold starts and reshards): not Redis being down. Retried once."""

PURGE_LOG = 256
"""Purges remembered in Redis (newest first) to keep fills begun before them from storing."""
PURGE_LOG_S = 3600
"""How long that list lives after the last purge: longer than any fill may take."""
CLOCK_READINGS = 5
"""Readings of Redis TIME at start-up; the one with the shortest round trip is kept."""
CLOCK_SANE_S = 86400.0
"""A Redis clock further than this from this machine's is refused (this machine's is kept)."""

EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")
"""maxmemory policies that may evict keys without a TTL protection: a lease or a stream key
can vanish mid-flight (cut streams, repeated upstream calls)."""


class Ready:
    """Initialises a Redis Cluster client once, behind a lock, before its first command.

    redis-py's async cluster client fails in odd ways (AttributeError on a connection not yet
    made, "Connection closed by server") when many coroutines make it initialise at once, as
    on a cold start under load. A plain client needs nothing."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.done = not isinstance(client, RedisCluster)
        self._lock: asyncio.Lock | None = None

    async def __call__(self) -> None:
        if self.done:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.done:
                await self.client.initialize()
                self.done = True


class RedisStore:
    name = "redis"

    def __init__(self, client: Any, prefix: str = "ocp", blocking: Any = None) -> None:
        self.client = client
        self.prefix = prefix
        self._blocking = blocking or client
        self._ready = Ready(client)
        # redis-py leaves a cluster node's connections without retries (its cluster layer
        # decides); a connection closed under a cold start gets one retry here, at once.
        self._retry_on: tuple[type[BaseException], ...] = RACES + (
            (RedisConnectionError,) if isinstance(client, RedisCluster) else ()
        )
        self.blocking_ready = Ready(self._blocking)
        self.warnings: list[str] = []
        """What an operator should know about this Redis (an evicting maxmemory policy)."""

    async def ping(self) -> None:
        """StoreUnavailable unless Redis answers a PING."""
        await self._call(self.client.ping)

    async def warm(self) -> None:
        """Connect (and initialise a cluster client) before the first request, and check the
        eviction policy. Raises StoreUnavailable if Redis cannot be reached."""
        await self._call(self.client.ping)
        await self._call(self._blocking.ping, ready=self.blocking_ready)
        await self._read_clock()
        try:
            got = await self.client.config_get("maxmemory-policy")
        except Exception:  # managed Redis often forbids CONFIG: nothing to say then
            return
        policies = set(got.values()) if isinstance(got, dict) else set()
        if isinstance(got, list):  # a cluster client answers per node
            for item in got:
                policies |= set(item.values()) if isinstance(item, dict) else set()
        for raw in policies:
            policy = raw.decode() if isinstance(raw, bytes) else str(raw)
            if policy in EVICTING_POLICIES:
                msg = (
                    f"Redis maxmemory-policy is {policy}: it may evict lease and stream keys "
                    "mid-flight; use noeviction or a volatile-* policy (see README)"
                )
                self.warnings.append(msg)
                log.warning("store.eviction_policy", store=self.name, policy=policy)

    async def _read_clock(self) -> None:
        """Take Redis's clock as the one for `created`, Age and max-age (see models.Clock).
        Each reading is off by at most half its round trip, and one round trip can be long
        (this process descheduled on a busy machine): the shortest of CLOCK_READINGS is kept,
        as NTP does, so instances on one store agree closely on when a purge came."""
        best: tuple[float, float] | None = None  # (round trip, offset)
        for _ in range(CLOCK_READINGS):
            try:
                before = time.time()
                got = await self._call(self.client.time)
                after = time.time()
                if isinstance(got, dict):  # a cluster client may answer per node
                    got = next(iter(got.values()))
                seconds, micros = got
                offset = float(seconds) + float(micros) / 1e6 - (before + after) / 2
            except Exception as exc:  # no TIME (a proxy in front of Redis...), or a bad answer
                log.info("store.clock_unavailable", store=self.name, error=type(exc).__name__)
                break
            if not math.isfinite(offset) or abs(offset) > CLOCK_SANE_S:
                log.warning("store.clock_refused", store=self.name, offset_s=str(offset)[:24])
                break
            reading = (after - before, offset)
            best = reading if best is None else min(best, reading)
        if best is None:  # this machine's clock
            return
        CLOCK.offset = best[1]  # the readings taken before any failure still count
        if abs(CLOCK.offset) > 1.0:
            log.warning("store.clock_skew", store=self.name, offset_s=round(CLOCK.offset, 3))

    def blocking_client(self) -> Any:
        """A client whose socket timeout leaves room for blocking stream reads."""
        return self._blocking

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        prefix = query.pop("prefix", ["ocp"])[0]
        try:
            timeout = float(query.pop("timeout", [str(DEFAULT_TIMEOUT_S)])[0])
        except ValueError:
            raise ConfigError(
                f"--cache / PROXY_CACHE: timeout in {url!r} is not a number"
            ) from None
        rest = "&".join(f"{k}={v[0]}" for k, v in query.items())
        kwargs: dict[str, Any] = {
            # A pooled connection that died with a Redis restart is retried once, at once,
            # before the store is declared down (redis-py's default backs off several times).
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 15,
            **_driver_info(),
        }
        slow = {**kwargs, "socket_timeout": timeout + 2.0}
        if parts.scheme == "redis+cluster":
            plain = urlunsplit(("redis", parts.netloc, parts.path, rest, ""))
            client: Any = RedisCluster.from_url(plain, **kwargs)
            blocking: Any = RedisCluster.from_url(plain, **slow)
        else:
            plain = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
            client = aioredis.from_url(plain, **kwargs)
            blocking = aioredis.from_url(plain, **slow)
        return cls(client, prefix, blocking)

    def _k(self, key: str) -> str:
        return f"{self.prefix}:resp:{key}"

    async def _call(self, call: Callable[[], Awaitable[T]], ready: Ready | None = None) -> T:
        """One client call; whatever the client raises (connection, timeout, and the cluster
        client's odd errors during a cold start or a reshard) is the store being unavailable.
        Those odd errors (a connection raced by another coroutine) get one immediate retry."""
        try:
            await (ready or self._ready)()
            try:
                return await call()
            except self._retry_on:
                return await call()
        except Exception as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def claim(self, name: str, value: bytes) -> bytes:
        """Set `{prefix}:meta:{name}` to `value` unless it is set (SET NX: one writer wins,
        whatever the race); what it holds after. No TTL: it lives as long as the entries."""
        key = f"{self.prefix}:meta:{name}"
        await self._call(lambda: self.client.set(key, value, nx=True))
        got = await self._call(lambda: self.client.get(key))
        return bytes(got) if got is not None else b""

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self._call(lambda: self.client.get(self._k(key)))
        return await entry_of(self, key, raw)

    async def get_many(self, keys: list[str]) -> list[CachedResponse | None]:
        """get() for many keys: one MGET (a cluster's keys live on many nodes: one GET each)."""
        if isinstance(self.client, RedisCluster):
            return list(await asyncio.gather(*(self.get(k) for k in keys)))
        names = [self._k(k) for k in keys]
        raws = await self._call(lambda: self.client.mget(names))
        return [await entry_of(self, key, raw) for key, raw in zip(keys, raws, strict=True)]

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        """Store an entry, then take it back if a purge naming its key, made by any instance,
        came after its fill began (see named). The SET and the read of the purge log go in
        one round trip, SET first: a purge logged after that read also scans after the SET,
        so it finds the entry itself. (One round trip: an instance that asks right after
        this answer finds it stored, not still being stored.)"""
        value = entry.to_bytes()
        px = max(1, int(ttl_s * 1000))
        name, log_name = self._k(key), self._purges_key()

        async def put() -> Any:
            if isinstance(self.client, RedisCluster):  # two slots: two commands, in order
                await self.client.set(name, value, px=px)
                return await self.client.lrange(log_name, 0, -1)
            pipe = self.client.pipeline(transaction=False)
            pipe.set(name, value, px=px)
            pipe.lrange(log_name, 0, -1)
            return (await pipe.execute())[1]

        rows = await self._call(put)
        if rows and self.named(rows, key, entry):
            await self._call(lambda: self.client.delete(name))

    def _purges_key(self) -> str:
        return f"{self.prefix}:purges"

    @staticmethod
    def named(rows: list[Any], key: str, entry: CachedResponse) -> bool:
        """Does a purge of the log `rows` (newest first, PURGE_LOG of them) name `key` after
        the fill of `entry` began (upstream_ms before it was made)?"""
        purges = []
        for row in rows:
            at, _, pattern = (row.decode() if isinstance(row, bytes) else str(row)).partition(" ")
            with contextlib.suppress(ValueError):
                purges.append((float(at), pattern))
        return purged_fill(key, entry, purges)

    async def _note_purge(self, pattern: str) -> None:
        """Tell every instance's later stores about this purge (see named), for an hour."""
        name, row = self._purges_key(), f"{CLOCK.now()!r} {pattern}"

        async def note() -> None:
            await self.client.lpush(name, row)
            await self.client.ltrim(name, 0, PURGE_LOG - 1)
            await self.client.expire(name, PURGE_LOG_S)

        await self._call(note)

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.client.delete(self._k(key)))

    async def purge(self, pattern: str) -> int:
        """UNLINK every entry whose key matches the glob `pattern`: SCAN MATCH in batches of
        1000 (every master of a cluster), so Redis is never blocked; how many went."""
        await self._note_purge(pattern)  # first: a fill that ends during the scan is not stored
        match = self._k(pattern)
        gone = 0
        batch: list[Any] = []

        async def flush() -> None:
            nonlocal gone, batch
            if not batch:
                return
            # One UNLINK of the batch: a cluster client splits it by slot and awaits each
            # part (on its pipeline, UNLINK is a coroutine that was never awaited).
            gone += int(await self.client.unlink(*batch))
            batch = []

        try:
            await self._ready()
            async for key in self.client.scan_iter(match=match, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await flush()
            await flush()
        except Exception as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return gone

    async def vectors_add(
        self, part: str, member: str, record: bytes, expires: float, keep: int
    ) -> None:
        """XADD to the partition's stream (trimmed to about `keep`), which lives as long as its
        newest record. A deleted entry's record stays until then; lookups skip it."""
        name = self._k(part)
        ttl = max(1, int(expires - CLOCK.now()) + 1)

        async def add() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(name, {b"r": record}, maxlen=keep, approximate=True)
            pipe.expire(name, ttl)
            await pipe.execute()

        await self._call(add)

    async def vectors_since(self, part: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        start = "-" if after == 0 else f"{after >> 22}-{(after & SEQ_MASK) + 1}"
        rows = await self._call(
            lambda: self.client.xrange(self._k(part), min=start, max="+", count=limit)
        )
        out: list[tuple[int, bytes]] = []
        for raw_id, fields in rows:
            ms, _, seq = (raw_id.decode() if isinstance(raw_id, bytes) else raw_id).partition("-")
            record = fields.get(b"r")
            if record is not None:
                out.append(((int(ms) << 22) | int(seq), record))
        return out

    async def keys(self) -> list[str]:
        """Every stored answer's key (maintenance commands only: it scans)."""
        start = len(self.prefix) + len(":resp:")
        found = [
            k.decode()[start:] async for k in self.client.scan_iter(match=self._k("*"), count=500)
        ]
        return [k for k in found if not is_partition(k)]

    async def aclose(self) -> None:
        """Close both clients: the store made them, the bus only borrows the blocking one."""
        try:
            await self.client.aclose()
        finally:
            if self._blocking is not self.client:
                await self._blocking.aclose()

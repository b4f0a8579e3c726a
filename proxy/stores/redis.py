"""Redis store: shared by every instance; entries always carry a TTL; values hold no secret.

Keys are `{prefix}:resp:{key}` where the key is already an HMAC, so nothing in Redis names a
tenant or a credential. Calls have short timeouts; the Cache breaker above turns failures
into pass-through. `redis+cluster://host:port` talks to a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable
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
from proxy.models import CachedResponse, CorruptEntry

log = structlog.get_logger()
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 0.5


def _driver_info() -> dict[str, Any]:
    """The client's CLIENT SETINFO data, built once here: left to redis-py, it reads package
    metadata from disk for every new connection, on the event loop."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7
        return {"lib_version": redis.__version__}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


class RedisStore:
    name = "redis"

    def __init__(self, client: Any, prefix: str = "ocp", blocking: Any = None) -> None:
        self.client = client
        self.prefix = prefix
        self._blocking = blocking or client

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

    async def _call(self, call: Awaitable[T]) -> T:
        """One client call; whatever the client raises (connection, timeout, and the cluster
        client's odd errors during a reshard) is the store being unavailable."""
        try:
            return await call
        except Exception as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self._call(self.client.get(self._k(key)))
        if raw is None:
            return None
        try:
            return CachedResponse.from_bytes(raw)
        except CorruptEntry as exc:
            log.warning("store.corrupt_entry", store=self.name, key=key[3:15], error=str(exc))
            await self.delete(key)
            return None

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        value = entry.to_bytes()
        await self._call(self.client.set(self._k(key), value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._call(self.client.delete(self._k(key)))

    async def keys(self) -> list[str]:
        """Every stored key (maintenance commands only: it scans)."""
        start = len(self.prefix) + len(":resp:")
        return [
            k.decode()[start:] async for k in self.client.scan_iter(match=self._k("*"), count=500)
        ]

    async def aclose(self) -> None:
        await self.client.aclose()

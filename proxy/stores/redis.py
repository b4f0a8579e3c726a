"""Redis store: shared by every instance; entries always carry a TTL; values hold no secret.

Keys are `{prefix}:resp:{key}` where the key is already an HMAC, so nothing in Redis names a
tenant or a credential. Calls have short timeouts; the Cache breaker above turns failures
into pass-through. `redis+cluster://host:port` talks to a Redis Cluster.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from proxy.errors import ConfigError
from proxy.models import CachedResponse

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

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self.client.get(self._k(key))
        if raw is None:
            return None
        try:
            return CachedResponse.from_bytes(raw)
        except (ValueError, KeyError):
            return None

    async def set(self, key: str, entry: CachedResponse, ttl_s: float) -> None:
        await self.client.set(self._k(key), entry.to_bytes(), px=max(1, int(ttl_s * 1000)))

    async def delete(self, key: str) -> None:
        await self.client.delete(self._k(key))

    async def keys(self) -> list[str]:
        """Every stored key (maintenance commands only: it scans)."""
        start = len(self.prefix) + len(":resp:")
        return [
            k.decode()[start:] async for k in self.client.scan_iter(match=self._k("*"), count=500)
        ]

    async def aclose(self) -> None:
        await self.client.aclose()

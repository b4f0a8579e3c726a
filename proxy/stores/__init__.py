"""Cache stores: where answers are kept. Only `open_store` branches on the backend."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from proxy.errors import ConfigError
from proxy.stores.base import Store
from proxy.stores.memory import MemoryStore
from proxy.stores.sqlite import DEFAULT_MAX_MB, SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store", "open_store"]


def _max_mb(url: str, query: dict[str, list[str]]) -> float | None:
    if "max_mb" not in query:
        return None
    try:
        value = float(query["max_mb"][0])
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--cache / PROXY_CACHE: max_mb in {url!r} must be a number above 0")
    return value


def open_store(url: str, data_dir: Path) -> Store:
    """Build the store a --cache URL names; empty means SQLite in the data directory."""
    if not url:
        return SQLiteStore(data_dir / "cache.db")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    max_mb = _max_mb(url, query)
    if parts.scheme == "memory":
        return MemoryStore(max_bytes=int((max_mb or 256.0) * 1024 * 1024))
    if parts.scheme == "sqlite":
        path = parts.netloc + parts.path if parts.netloc else parts.path
        if not path or path == "/":
            raise ConfigError(f"--cache / PROXY_CACHE: {url!r} names no file (sqlite:///path.db)")
        return SQLiteStore(Path(path), max_bytes=int((max_mb or DEFAULT_MAX_MB) * 1024 * 1024))
    if parts.scheme in ("redis", "rediss", "redis+cluster"):
        from proxy.stores.redis import RedisStore

        return RedisStore.from_url(url)
    raise ConfigError(f"--cache / PROXY_CACHE: unknown store {parts.scheme!r} in {url!r}")

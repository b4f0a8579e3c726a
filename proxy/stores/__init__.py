"""Cache stores: where answers are kept. Only `open_store` branches on the backend."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from proxy.errors import ConfigError
from proxy.stores.base import Store
from proxy.stores.memory import MemoryStore
from proxy.stores.sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "Store", "open_store"]


def open_store(url: str, data_dir: Path) -> Store:
    """Build the store a --cache URL names; empty means SQLite in the data directory."""
    if not url:
        return SQLiteStore(data_dir / "cache.db")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "memory":
        try:
            max_mb = float(query.get("max_mb", ["256"])[0])
        except ValueError:
            raise ConfigError(f"--cache / PROXY_CACHE: max_mb in {url!r} is not a number") from None
        return MemoryStore(max_bytes=int(max_mb * 1024 * 1024))
    if parts.scheme == "sqlite":
        path = parts.netloc + parts.path if parts.netloc else parts.path
        if not path or path == "/":
            raise ConfigError(f"--cache / PROXY_CACHE: {url!r} names no file (sqlite:///path.db)")
        return SQLiteStore(Path(path))
    if parts.scheme in ("redis", "rediss", "redis+cluster"):
        from proxy.stores.redis import RedisStore

        return RedisStore.from_url(url)
    raise ConfigError(f"--cache / PROXY_CACHE: unknown store {parts.scheme!r} in {url!r}")

"""Images in a local folder, served by the proxy at /_proxy/images/<name>."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from proxy.images.base import CONTENT_TYPES, NAME_RE


class LocalImageStore:
    name = "file"

    def __init__(self, root: Path, *, public_url: str = "") -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")

    def _put(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / name
        if final.exists():
            return
        # Whole or nothing: write a temporary file, then rename it into place.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._put, name, data)

    async def url(self, name: str, request_base: str) -> str:
        return f"{self.public_url or request_base.rstrip('/')}/_proxy/images/{name}"

    def _get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    async def get(self, name: str) -> tuple[bytes, str] | None:
        """The stored bytes and content type; None for an unknown or malformed name."""
        if not NAME_RE.match(name):
            return None
        data = await asyncio.to_thread(self._get, name)
        if data is None:
            return None
        return data, CONTENT_TYPES[name.rsplit(".", 1)[1]]

    async def aclose(self) -> None:
        return None

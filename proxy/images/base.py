"""The ImageStore protocol, content-addressed names and image sniffing. Pure."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

NAME_RE = re.compile(r"^[0-9a-f]{64}\.(png|jpg|webp|gif)$")

_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"\xff\xd8\xff", "jpg", "image/jpeg"),
    (b"GIF87a", "gif", "image/gif"),
    (b"GIF89a", "gif", "image/gif"),
)
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


def sniff(data: bytes) -> tuple[str, str] | None:
    """(extension, content type) from the magic bytes, or None if it is no image we keep."""
    for magic, ext, ctype in _MAGIC:
        if data.startswith(magic):
            return ext, ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


def image_name(data: bytes, ext: str) -> str:
    """sha256 of the bytes plus the extension: the same image always gets the same name."""
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


class ImageStore(Protocol):
    """Where rehosted images live. `put` is whole-object and idempotent (names are hashes)."""

    name: str

    async def put(self, name: str, data: bytes, content_type: str) -> None: ...

    async def url(self, name: str, request_base: str) -> str:
        """The permanent (or, for presigned S3, long-lived) link clients get for `name`."""
        ...

    async def aclose(self) -> None: ...

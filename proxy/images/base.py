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


PLACEHOLDER_BASE = "http://openai-cache-proxy.invalid"
"""Stands for "the base URL the asking client reached the proxy at" in stored answers whose
image links the proxy serves itself (no --public-url): each client gets links under its own
Host, and no Host is ever baked into an answer another client receives."""
_PLACEHOLDER = PLACEHOLDER_BASE.encode()
_HOST_RE = re.compile(  # linear: no nested quantifiers on a client-given Host
    r"^[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?$"
)


def has_placeholder(body: bytes) -> bool:
    return _PLACEHOLDER in body


def client_base(scheme: str, host: str | None, fallback: str) -> str:
    """The base URL for one client's links: its own scheme and Host when the Host is a plain
    host[:port] (anything else, such as quotes or paths in a forged Host, gets `fallback`)."""
    if host and len(host) <= 261 and _HOST_RE.match(host):
        return f"{'https' if scheme == 'https' else 'http'}://{host}"
    return fallback


def rebase(body: bytes, base: str) -> bytes:
    """The stored answer with its placeholder links pointing at `base`."""
    return body.replace(_PLACEHOLDER, base.rstrip("/").encode())

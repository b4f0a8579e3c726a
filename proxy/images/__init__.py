"""Generated images kept forever: fetch OpenAI's expiring image URLs once, store the bytes
under a content-addressed name, rewrite the URLs. Only `open_image_store` branches on the
backend (file:// or s3://)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from proxy.errors import ConfigError
from proxy.images.base import ImageStore
from proxy.images.local import LocalImageStore

__all__ = ["ImageStore", "LocalImageStore", "open_image_store"]


def open_image_store(
    url: str,
    data_dir: Path,
    *,
    public_url: str = "",
    images_public_url: str = "",
    s3_endpoint_url: str = "",
) -> ImageStore:
    """The image store a --images URL names; empty means a folder in the data directory."""
    if not url:
        return LocalImageStore(data_dir / "images", public_url=public_url)
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = parts.netloc + parts.path
        if not path:
            raise ConfigError(f"--images / PROXY_IMAGES: {url!r} names no folder (file:///dir)")
        return LocalImageStore(Path(path), public_url=public_url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(
                f"--images / PROXY_IMAGES: {url!r} names no bucket (s3://bucket/prefix)"
            )
        from proxy.images.s3 import S3ImageStore

        return S3ImageStore(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint_url=s3_endpoint_url or None,
            public_url=images_public_url,
        )
    raise ConfigError(f"--images / PROXY_IMAGES: {url!r} is not file:///dir or s3://bucket/prefix")

"""Images in S3 or any S3-compatible store (Cloudflare R2) through boto3, off the event loop."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

PRESIGN_MAX_S = 7 * 24 * 3600  # SigV4's longest expiry: presigned links are NOT permanent


class S3ImageStore:
    """Objects under `prefix/` in `bucket`; links from `public_url` or presigned GETs.

    Credentials come from the standard AWS variables (or R2's keys set as them); the endpoint
    from `endpoint_url`, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL as boto3 reads them.
    """

    name = "s3"

    def __init__(
        self, *, bucket: str, prefix: str, endpoint_url: str | None, public_url: str = ""
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.public_url = public_url.rstrip("/")
        self.client: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                # One retry at most: rehosting as a whole is bounded by --image-timeout-s, and
                # stacked 30 s attempts only held answers back.
                connect_timeout=5,
                read_timeout=10,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.key(name),
            Body=data,
            ContentType=content_type,
            CacheControl="public, max-age=31536000, immutable",
        )

    async def url(self, name: str, request_base: str) -> str:
        if self.public_url:
            return f"{self.public_url}/{self.key(name)}"
        params: Any = {"Bucket": self.bucket, "Key": self.key(name)}
        # Signing may resolve credentials (files, metadata service): keep it off the loop.
        url: str = await asyncio.to_thread(
            self.client.generate_presigned_url, "get_object", Params=params, ExpiresIn=PRESIGN_MAX_S
        )
        return url

    async def aclose(self) -> None:
        await asyncio.to_thread(self.client.close)

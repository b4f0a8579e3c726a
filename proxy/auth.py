"""Revoked keys stop getting cached answers within a bounded window.

A HIT proves nothing about the credential that asked for it, so a credential is re-checked
upstream (a free `GET /v1/models` with the caller's own headers) when it was last seen
accepted more than `recheck_s` ago. Any 2xx upstream answer for the tenant counts as seen.
A 401/403 refuses the HIT (the client gets upstream's own error); an upstream that cannot
answer the check does not block cached answers (they are retried a minute later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.errors import UpstreamError
from proxy.upstream import Upstream, response_headers

AUTH_HEADERS = (
    "Authorization",
    "api-key",
    "x-api-key",
    "OpenAI-Organization",
    "OpenAI-Project",
)
"""Every header that makes the tenant (keys.credential_of), and only those."""
RETRY_UNKNOWN_S = 60.0


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class CredentialCheck:
    def __init__(self, upstream: Upstream, recheck_s: float) -> None:
        self.upstream = upstream
        self.recheck_s = recheck_s
        self._until: dict[bytes, float] = {}
        self._pending: dict[bytes, asyncio.Future[Refusal | None]] = {}

    def seen(self, tenant: bytes) -> None:
        """The upstream accepted this tenant's credential just now."""
        if self.recheck_s > 0:
            if len(self._until) > 100_000:
                self._until.clear()
            self._until[tenant] = time.monotonic() + self.recheck_s

    def fresh(self, tenant: bytes) -> bool:
        return self.recheck_s <= 0 or self._until.get(tenant, 0.0) > time.monotonic()

    async def check(self, tenant: bytes, headers: Mapping[str, str]) -> Refusal | None:
        """None if cached answers may be served to this credential, else upstream's refusal."""
        pending = self._pending.get(tenant)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Refusal | None] = asyncio.get_running_loop().create_future()
        self._pending[tenant] = future
        try:
            result = await self._ask(tenant, headers)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[tenant]

    async def _ask(self, tenant: bytes, headers: Mapping[str, str]) -> Refusal | None:
        ask: CIMultiDict[str] = CIMultiDict(
            (name, headers[name]) for name in AUTH_HEADERS if name in headers
        )
        try:
            async with self.upstream.request("GET", "/v1/models", ask, b"") as resp:
                body = await resp.read()
                status = resp.status
                kept = response_headers(resp.headers)
        except UpstreamError:
            self._until[tenant] = time.monotonic() + RETRY_UNKNOWN_S
            return None
        if 200 <= status < 300:
            self.seen(tenant)
            return None
        if status in (401, 403):
            self._until.pop(tenant, None)
            return Refusal(status, kept, body)
        self._until[tenant] = time.monotonic() + RETRY_UNKNOWN_S  # cannot tell: ask again later
        return None

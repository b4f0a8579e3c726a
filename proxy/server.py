"""The HTTP server under the proxy: aiohttp's low-level server with connection deadlines.

aiohttp closes idle keep-alive connections (`keepalive_timeout`) but has no deadline for the
request head itself, so a client that sends half a header line (or a byte every few seconds)
holds a connection, and a file descriptor, for as long as it likes. Here a connection whose
request head is not complete within `header_timeout_s` of its first byte (or of the
connection opening) is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class GuardedHandler(RequestHandler):
    """aiohttp's RequestHandler plus a deadline for each request head."""

    def __init__(self, manager: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()  # a whole request head arrived
        elif self._header_deadline is None and not self._request_in_progress:
            self._arm()  # the first bytes of a new head, between requests

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timeout_s > 0:
            self._header_deadline = self._loop.call_later(self._header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if not self._request_in_progress and not self._messages:
            self.force_close()


class GuardedServer(web.Server):
    """web.Server whose connections are GuardedHandlers."""

    def __init__(self, handler: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        return GuardedHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )

"""The few exception types of the proxy, and OpenAI-shaped error bodies."""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError, ValueError):
    """A setting, URL or rule is wrong; start-up stops with this one line."""


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke off."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer in time."""


class StoreUnavailable(ProxyError):
    """The cache store failed; the request goes on as a pass-through."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON body OpenAI uses for errors, so SDKs raise their usual exception types."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )

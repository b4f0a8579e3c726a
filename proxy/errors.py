"""The few exception types of the proxy, and OpenAI-shaped error bodies."""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError, ValueError):
    """A setting, URL or rule is wrong; start-up stops with this one line."""


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke off."""

    def client_message(self) -> str:
        """The message a client gets in the proxy's 502: one sentence, bounded (the cause can
        quote upstream bytes)."""
        text = str(self) or "the upstream failed"
        text = text[0].upper() + text[1:]
        return text if len(text) <= 300 else text[:299] + "~"


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer in time."""


class StoreUnavailable(ProxyError):
    """The cache store failed; the request goes on as a pass-through."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON body OpenAI uses for errors, so SDKs raise their usual exception types."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )

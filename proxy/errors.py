"""Every exception type of the proxy, under one base (ProxyError), and OpenAI-shaped error
bodies."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy.status import Failure


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


class GivenUp(UpstreamError):
    """An upstream read the proxy gave up on purpose (a limit passed), with its reason."""

    def __init__(self, message: str, reason: Failure) -> None:
        super().__init__(message)
        self.reason = reason


class StoreUnavailable(ProxyError):
    """The cache store failed; the request goes on as a pass-through."""


# -- raised and handled inside the data path ------------------------------------------------


class BadBody(ProxyError, ValueError):
    """The body could not be parsed as what its content type says, or is out of bounds."""

    status = 400
    code = "invalid_body"


class TooManyParts(BadBody):
    code = "too_many_parts"


class TooDeep(BadBody):
    code = "nested_too_deeply"


class Inexact(ProxyError):
    """A number in the body has no exact canonical form here (an integer past 64 bits):
    the body must be keyed by its exact bytes instead."""


class BodyTooLarge(ProxyError):
    """The decoded body would exceed the limit."""


class UnknownEncoding(ProxyError):
    """A Content-Encoding the proxy cannot decode: the request passes through as it came."""


class CorruptEntry(ProxyError, ValueError):
    """Stored bytes that are not a whole stored answer."""


class NotConvertible(ProxyError, ValueError):
    """The stored answer is not the shape its route streams or returns."""


class Lagged(ProxyError):
    """A reader fell behind the part of an overflowing flight that is still kept."""


class BusError(ProxyError):
    """Redis failed under the bus; callers fall back to in-process coalescing."""


class EmbeddingFailed(ProxyError):
    """No embedding for this request; `caller` when the upstream refused this caller (4xx)."""

    def __init__(self, reason: str, *, caller: bool = False) -> None:
        super().__init__(reason)
        self.caller = caller


class RehostError(ProxyError):
    """An image could not be fetched or stored; the answer is passed on untouched."""


class BadFilter(ProxyError, ValueError):
    """The purge filters are missing or malformed."""


@dataclass(frozen=True, slots=True)
class FailureAnswer:
    """The proxy's own answer for an upstream it could not get an answer from."""

    status: int
    code: Failure
    """Also the request line's `error`."""
    message: str

    @property
    def body(self) -> bytes:
        return error_body(self.message, "proxy_error", self.code)


def failure_answer(exc: BaseException) -> FailureAnswer:
    """504 for a silent upstream, 502 for an unreachable or broken one, 502 for a proxy bug:
    the one place these answers are worded (pass-through and flights alike)."""
    if isinstance(exc, UpstreamTimeout):
        return FailureAnswer(
            504, Failure.UPSTREAM_TIMEOUT, "The upstream API did not answer in time."
        )
    if isinstance(exc, UpstreamError):
        return FailureAnswer(502, Failure.UPSTREAM_UNREACHABLE, exc.client_message())
    return FailureAnswer(
        502, Failure.PROXY_FAILURE, "The proxy failed while reading the upstream answer."
    )


def cut_reason(exc: BaseException) -> Failure:
    """Why an answer broke off after its head, for an exception that ended its read."""
    if isinstance(exc, GivenUp):
        return exc.reason
    if isinstance(exc, UpstreamTimeout):
        return Failure.UPSTREAM_TIMEOUT
    if isinstance(exc, UpstreamError):
        return Failure.UPSTREAM_CUT
    return Failure.PROXY_FAILURE


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON body OpenAI uses for errors, so SDKs raise their usual exception types."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def json_error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    """An OpenAI-shaped error answer."""
    return web.Response(
        status=status,
        body=error_body(message, type_, code),
        content_type="application/json",
    )

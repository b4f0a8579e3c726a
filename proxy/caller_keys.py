"""The caller's say over the key: X-Cache-Key, X-Cache-Ignore-Fields, X-Cache-TTL and the
documented cache headers of Cloudflare's AI Gateway and of Helicone, so that apps move over
without code changes. Pure (but for `Request`, the hook that labels Cache-Status).

| header                         | meaning here                                            |
|--------------------------------|---------------------------------------------------------|
| `X-Cache-Key: <string>`        | the entry's name, scoped to the tenant and namespace as |
| `cf-aig-cache-key`             | always; the body still goes upstream on a MISS, and two  |
|                                | bodies under one caller key share one answer            |
| `X-Cache-Ignore-Fields: a,b.c` | dotted body fields left out of this request's key, on   |
| `Helicone-Cache-Ignore-Keys`   | top of the rule's ignore_fields                         |
| `X-Cache-TTL: <s>`             | Cache-Control: max-age=<s> (a shorter life on store)    |
| `cf-aig-cache-ttl` (`cf-cache-ttl`) | the same, in [60, 2592000] s as Cloudflare documents |
| `cf-aig-skip-cache: true` (`cf-skip-cache`) | Cache-Control: no-store (BYPASS)           |
| `Helicone-Cache-Enabled: false`| Cache-Control: no-store (`true` changes nothing: this   |
|                                | proxy caches by default)                                |

A rule with `caller_keys = false` keys its requests by their body whatever the caller
sends (the line says `caller_key: "refused"`); the TTL and skip headers still apply, as
Cache-Control does. None of these headers goes upstream (upstream.PROXY_REQUEST_HEADERS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from proxy.errors import BadBody

KEY_HEADERS = (istr("X-Cache-Key"), istr("cf-aig-cache-key"))
IGNORE_HEADERS = (istr("X-Cache-Ignore-Fields"), istr("Helicone-Cache-Ignore-Keys"))
TTL_HEADERS = (istr("X-Cache-TTL"),)
CF_TTL_HEADERS = (istr("cf-aig-cache-ttl"), istr("cf-cache-ttl"))
SKIP_HEADERS = (istr("cf-aig-skip-cache"), istr("cf-skip-cache"))
ENABLED_HEADERS = (istr("Helicone-Cache-Enabled"),)
ALL_HEADERS = (
    *KEY_HEADERS,
    *IGNORE_HEADERS,
    *TTL_HEADERS,
    *CF_TTL_HEADERS,
    *SKIP_HEADERS,
    *ENABLED_HEADERS,
)
"""(istr: a multidict lookup by an istr skips folding the name's case on every request.)"""
CALLER_HEADERS = frozenset(h.lower() for h in ALL_HEADERS)
"""Every header read here (lower case): never forwarded upstream."""

KEY_MAX = 1024
"""Longest caller key (characters): it is hashed into the key, never kept or logged."""
FIELDS_MAX = 64
"""Most fields one request may leave out of its key."""
FIELD_MAX = 256
"""Longest dotted field name."""
CF_TTL_MIN, CF_TTL_MAX = 60.0, 30 * 86400.0
"""Cloudflare's documented bounds for cf-aig-cache-ttl (60 s to one month)."""
TTL_MAX = 2.0**31


class BadCacheHeader(BadBody):
    """A caller cache header the proxy cannot read (answered 400, OpenAI-shaped)."""

    code = "invalid_cache_header"


@dataclass(frozen=True, slots=True)
class CallerControls:
    """What the caller's cache headers ask for one request."""

    key: str | None = None
    """X-Cache-Key (or its alias): the entry's name in place of the body."""
    ignore: tuple[str, ...] = ()
    """Dotted fields left out of this request's key."""
    ttl_s: float | None = None
    """A max-age for this request (lookup and store), as Cache-Control: max-age."""
    skip: bool = False
    """Neither read nor store (as Cache-Control: no-store)."""

    memo: str = ""
    """What the plan memo must tell apart: the parts that change the key (of())."""
    keys: bool = False
    """Does it change the key (a caller key or ignored fields)?"""

    @classmethod
    def of(
        cls, key: str | None, ignore: tuple[str, ...], ttl_s: float | None, skip: bool
    ) -> CallerControls:
        """Controls with their memo and keys worked out (fields, not properties: the data
        path reads them on every request)."""
        if key is None and not ignore:
            return cls(key, ignore, ttl_s, skip)
        memo = f"{len(key or '')}:{key or ''}|{','.join(ignore)}"
        return cls(key, ignore, ttl_s, skip, memo, True)


NO_CALLER = CallerControls()


def _first(headers: Mapping[str, str], names: tuple[istr, ...]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def _seconds(value: str, name: str) -> float:
    v = value.strip()
    if not v.isascii() or not v.isdigit():
        raise BadCacheHeader(f"The {name} header must be a whole number of seconds.")
    return float(min(int(v[:12]), int(TTL_MAX)))


def _fields(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(f.strip() for f in value.split(",") if f.strip()))
    if len(names) > FIELDS_MAX or any(len(n) > FIELD_MAX for n in names):
        raise BadCacheHeader(
            f"X-Cache-Ignore-Fields takes at most {FIELDS_MAX} fields of at most "
            f"{FIELD_MAX} characters."
        )
    return tuple(sorted(names))


def read_caller(headers: Mapping[str, str]) -> CallerControls:
    """The caller's cache headers (NO_CALLER when there are none). Raises BadCacheHeader."""
    for name in ALL_HEADERS:  # most requests carry none: the cheapest check first
        if name in headers:
            break
    else:
        return NO_CALLER
    key = _first(headers, KEY_HEADERS)
    ignore_raw = _first(headers, IGNORE_HEADERS)
    ttl_raw = _first(headers, TTL_HEADERS)
    cf_ttl = _first(headers, CF_TTL_HEADERS)
    skip_raw = _first(headers, SKIP_HEADERS)
    enabled = _first(headers, ENABLED_HEADERS)
    if key is not None:
        key = key.strip()
        if len(key) > KEY_MAX:
            raise BadCacheHeader(f"X-Cache-Key takes at most {KEY_MAX} characters.")
        key = key or None
    ignore = _fields(ignore_raw) if ignore_raw is not None else ()
    ttl: float | None = None
    if ttl_raw is not None:
        ttl = _seconds(ttl_raw, "X-Cache-TTL")
    elif cf_ttl is not None:
        ttl = min(max(_seconds(cf_ttl, "cf-aig-cache-ttl"), CF_TTL_MIN), CF_TTL_MAX)
    skip = (skip_raw is not None and skip_raw.strip().lower() == "true") or (
        enabled is not None and enabled.strip().lower() == "false"
    )
    return CallerControls.of(key, ignore, ttl, skip)


SHAPE_FIELDS = ("encoding_format", "response_format", "output_format")
"""Body fields whose string value decides the form of an answer (base64 or floats, a URL or
bytes, mp3 or wav): a caller key never spans two forms."""


def caller_canonical(key: str, fields: Mapping[str, Any], twin: str | None, route: str) -> bytes:
    """What a caller-keyed request's key is built over in place of its canonical body: the
    caller's key and the form its answer takes. On chat and Responses a stored stream and a
    JSON answer convert into each other (twins); elsewhere `stream` is part of the form."""
    shape: dict[str, Any] = {}
    if twin is None:
        shape["stream"] = fields.get("stream") in (True, "true", "True")
    if route.endswith("/embeddings"):
        shape["encoding_format"] = "float"  # OpenAI's default
    for name in SHAPE_FIELDS:
        value = fields.get(name)
        if isinstance(value, str):
            shape[name] = value[:64]
    form = orjson.dumps(shape, option=orjson.OPT_SORT_KEYS)
    return b"caller-key\0" + key.encode("utf-8", "surrogatepass") + b"\0form\0" + form


DETAIL = web.RequestKey("cache_detail", str)
"""Request mapping key: the RFC 9211 `detail` this request's Cache-Status carries."""


class Request(web.BaseRequest):
    """The server's request: when the data path set DETAIL (a caller key or ignored fields
    made the key), every answer's Cache-Status says so, streamed or whole, at the one
    moment aiohttp sends the head."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        detail = self._state.get(DETAIL) if self._state else None
        if detail is not None:
            status = response.headers.get("Cache-Status")
            if status is not None and "detail=" not in status:
                response.headers["Cache-Status"] = f"{status}; detail={detail}"


def caller_fields(
    request: web.BaseRequest, extra: dict[str, object], used: str, caller: CallerControls
) -> None:
    """What the log line and Cache-Status say about a key the caller shaped (Plan.caller)."""
    if used == "refused":
        extra["caller_key"] = "refused"
        return
    if caller.key is not None:
        extra["caller_key"] = True
    if caller.ignore:
        extra["ignored_fields"] = len(caller.ignore)
    request[DETAIL] = '"caller-key, ignored-fields"' if "," in used else used

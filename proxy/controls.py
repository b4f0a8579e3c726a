"""What the client asks of the cache for one request, read from its headers: Cache-Control
(no-store, no-cache, max-age, stale-if-error, RFC 9111), X-Cache-Namespace, and the caller's
cache headers (caller_keys.py), which amend them. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from multidict import CIMultiDictProxy

from proxy.caller_keys import NO_CALLER, CallerControls, read_caller


class Mode(Enum):
    LOOKUP = "lookup"
    """Normal: answer from the cache, else fetch and store."""
    REFRESH = "refresh"
    """Cache-Control: no-cache: skip the lookup, store the fresh answer."""
    BYPASS = "bypass"
    """Cache-Control: no-store: neither read nor write, no coalescing."""


@dataclass(frozen=True, slots=True)
class ClientControls:
    mode: Mode
    max_age: float | None
    namespace: str
    stale_if_error: float | None = None
    """Cache-Control: stale-if-error=N: this request accepts an answer up to N s stale when
    the upstream fails."""

    def stale_window(self, rule_s: float) -> float:
        """Seconds past freshness an answer may be served when the upstream fails: the rule's
        option, the request's directive, or the smaller of both."""
        if self.stale_if_error is None:
            return rule_s
        return min(self.stale_if_error, rule_s) if rule_s > 0 else self.stale_if_error


DEFAULT_CONTROLS = ClientControls(Mode.LOOKUP, None, "")


DELTA_MAX = 2**31
"""RFC 9111 1.2.2: a delta-seconds too large to represent counts as 2^31."""


def delta_seconds(arg: str) -> float | None:
    """A Cache-Control delta-seconds (digits only, RFC 9111 1.2.2); None when invalid, so the
    directive is ignored (a negative, fractional or `nan` value is not 0)."""
    arg = arg.strip().strip('"')
    if not arg or not arg.isascii() or not arg.isdigit():
        return None
    return float(min(int(arg[:12]), DELTA_MAX))


def parse_cache_control(value: str | None, namespace: str | None) -> ClientControls:
    """Read the request's Cache-Control (no-store, no-cache, max-age=N) and X-Cache-Namespace.

    `value` is every Cache-Control line joined with commas (RFC 9110 5.3: one list)."""
    if value is None and namespace is None:
        return DEFAULT_CONTROLS
    mode, max_age = Mode.LOOKUP, None
    stale: float | None = None
    if value:
        for part in value.lower().split(","):
            name, _, arg = part.strip().partition("=")
            name = name.strip()
            if name == "no-store":
                mode = Mode.BYPASS
            elif name == "no-cache" and mode is not Mode.BYPASS:
                mode = Mode.REFRESH
            elif name == "max-age":
                seconds = delta_seconds(arg)
                if seconds is not None:
                    max_age = seconds if max_age is None else min(max_age, seconds)
            elif name == "stale-if-error":
                seconds = delta_seconds(arg)
                if seconds is not None:
                    stale = seconds if stale is None else min(stale, seconds)
    return ClientControls(mode, max_age, (namespace or "").strip(), stale)


def with_caller(controls: ClientControls, caller: CallerControls) -> ClientControls:
    """Cache-Control as the caller's cache headers amend it: skip is no-store, a TTL a
    max-age (the shorter one wins)."""
    mode, max_age = controls.mode, controls.max_age
    if caller.skip:
        mode = Mode.BYPASS
    if caller.ttl_s is not None:
        max_age = caller.ttl_s if max_age is None else min(max_age, caller.ttl_s)
    if mode is controls.mode and max_age == controls.max_age:
        return controls
    return ClientControls(mode, max_age, controls.namespace, controls.stale_if_error)


def read_controls(headers: CIMultiDictProxy[str]) -> tuple[ClientControls, CallerControls]:
    """The request's cache headers: what it asks (ClientControls: Cache-Control and
    X-Cache-Namespace, as the caller's headers amend them) and the caller's own headers
    (CallerControls). Raises BadCacheHeader."""
    cache_control = headers.getall("Cache-Control", None)
    controls = parse_cache_control(
        ",".join(cache_control) if cache_control else None, headers.get("X-Cache-Namespace")
    )
    caller = read_caller(headers)
    if caller is not NO_CALLER:
        controls = with_caller(controls, caller)
    return controls, caller

"""Purge: delete cached answers by namespace, tenant, model and route (ANDed).

`POST /_proxy/purge` with a JSON object of filters (admin token required), or
`python -m proxy purge --namespace ... [server flags]` straight on the configured store, with
the proxy running or stopped. Answers are found by their key pattern (keys.purge_pattern):
Redis is scanned in batches (never blocked), SQLite deleted in batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from proxy.errors import BadFilter, ConfigError
from proxy.keys import idem_pattern, purge_pattern
from proxy.settings import Settings

FILTERS = ("namespace", "tenant", "model", "route")
FILTER_MAX = 1 << 20
"""Longest filter value: a model name is matched whole, however long the client sent it."""
TENANT_RE = re.compile(r"^[0-9a-f]{12}$")


def patterns_of(filters: dict[str, Any]) -> tuple[str, ...]:
    """The key globs for a JSON object of filters; BadFilter unless it is one. A purge by
    tenant and / or namespace alone takes their Idempotency-Key entries too (those keys name
    no model or route: a model or route purge leaves them to their TTL)."""
    pattern = pattern_of(filters)
    given = {k for k, v in filters.items() if v is not None}
    if given & {"model", "route"}:
        return (pattern,)
    idem = idem_pattern(tenant=filters.get("tenant"), namespace=filters.get("namespace"))
    return (pattern, idem)


def pattern_of(filters: dict[str, Any]) -> str:
    """The key glob for a JSON object of filters; BadFilter unless it is one."""
    if not isinstance(filters, dict):
        raise BadFilter("The purge body must be a JSON object of filters.")
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise BadFilter(f"Unknown purge filter(s): {', '.join(unknown)}; use {', '.join(FILTERS)}.")
    given = {k: v for k, v in filters.items() if v is not None}
    if not given:
        raise BadFilter(f"Give at least one filter: {', '.join(FILTERS)}.")
    for name, value in given.items():
        if not isinstance(value, str) or len(value) > FILTER_MAX:
            raise BadFilter(f"The purge filter {name} must be a string.")
    tenant = given.get("tenant")
    if tenant is not None and not TENANT_RE.match(tenant):
        raise BadFilter("tenant is the 12-character id of the log lines (hex).")
    return purge_pattern(
        tenant=tenant,
        namespace=given.get("namespace"),
        model=given.get("model"),
        route=_route(given.get("route")),
    )


def _route(route: str | None) -> str | None:
    """Routes as the proxy keys them: /chat/completions is /v1/chat/completions."""
    if route is None:
        return None
    from proxy.intake import route_of

    return route_of(route)[0]


def main(argv: Sequence[str]) -> int:
    def filters(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("filters (at least one; ANDed)")
        group.add_argument("--namespace", metavar="NAME", help="the X-Cache-Namespace answers")
        group.add_argument(
            "--tenant", metavar="ID", help="one tenant (the 12-character id of the log lines)"
        )
        group.add_argument("--model", metavar="NAME", help="answers for this model")
        group.add_argument("--route", metavar="/v1/...", help="answers of this route")

    settings, ns = Settings.parse(
        argv,
        prog="python -m proxy purge",
        description="Delete cached answers matching every filter given. It works straight on "
        "the store --cache names (embedded SQLite in --data-dir, or Redis), so the proxy may "
        'be running or stopped; it prints {"purged": N}.',
        epilog=None,
        only=("cache", "data_dir"),
        extra=filters,
    )
    try:
        patterns = patterns_of({name: getattr(ns, name) for name in FILTERS})
    except BadFilter as exc:
        raise ConfigError(str(exc)) from None
    from proxy.errors import StoreUnavailable
    from proxy.stores import open_store

    store = open_store(settings.cache, settings.data_dir)

    async def run() -> int:
        try:
            purge = getattr(store, "purge", None)
            if purge is None:
                return 0
            gone = 0
            for pattern in patterns:
                gone += await purge(pattern)
            return gone
        finally:
            with contextlib.suppress(Exception):
                await store.aclose()

    try:
        purged = asyncio.run(run())
    except StoreUnavailable as exc:
        raise ConfigError(
            f"--cache / PROXY_CACHE: the store did not answer ({exc}); start it, or name the "
            "one the proxy uses"
        ) from None
    sys.stdout.write(orjson.dumps({"purged": purged}).decode() + "\n")
    return 0

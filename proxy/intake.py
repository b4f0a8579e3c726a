"""A client request -> Intake (the body read, capped and decoded; the tenant; the headers
that steer the cache; the Plan, memoised on the raw bytes), or the 4xx answer that refuses
it, or Opaque (a body in a coding the proxy cannot read: forwarded as it came)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, cast

import structlog
from aiohttp import web

from proxy.body import decodable, decode
from proxy.caller_keys import CallerControls, caller_fields
from proxy.controls import ClientControls, read_controls
from proxy.errors import BadBody, BodyTooLarge, json_error
from proxy.keys import Scope, request_digest, tenant_digest
from proxy.plan import (
    Keyed,
    PassThrough,
    Plan,
    decide,
    idempotency_key,
    make_plan,
    passthrough_fingerprint,
)
from proxy.prompt_cache import with_prompt_cache_key
from proxy.record import Record
from proxy.state import OFF_LOOP_BYTES, Forward, Planner, off_loop
from proxy.upstream import forward_headers

log = structlog.get_logger()

PLAN_MEMO_MAX = 20_000
PROCESS_BYTES = 1024 * 1024
"""Bodies larger than this are planned (parsed) in a worker process: a JSON parser holds the
GIL, so on a thread it would stall the loop as long as it parses (about 0.5 s for 15 MB of
nested arrays), and every other client with it."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The request is answered before it is planned (a 4xx: too large, a bad body...)."""

    answer: web.Response


@dataclass(frozen=True, slots=True)
class Opaque:
    """A body in a Content-Encoding the proxy cannot read: forwarded as it came, unkeyed."""

    forward: Forward


class Intake(NamedTuple):
    """A request read and planned: what every later stage needs to know of it. (A
    NamedTuple: on every HIT, it builds for a third of a frozen dataclass's cost.)"""

    request: web.BaseRequest
    body: bytes
    """As read, decoded from its Content-Encoding."""
    decoded: bool
    route: str
    """The route rules match (route_of)."""
    upstream_path: str
    query: str
    controls: ClientControls
    caller: CallerControls
    idem: str | None
    """The Idempotency-Key header."""
    plan: Plan
    tenant: bytes
    t0: float
    """When the request arrived (time.perf_counter)."""


async def read_intake(
    pl: Planner,
    request: web.BaseRequest,
    route: str,
    upstream_path: str,
    query: str,
    rec: Record,
    t0: float,
) -> Refused | Opaque | Intake:
    """Read the request: its body (capped, decoded), its cache headers, its Plan."""
    if request.raw_path[:1] != "/":
        return Refused(_bad_target())
    content = request.content
    if content.is_eof() and not request.headers.get("Expect"):
        body = content.read_nowait()  # the whole body came with the head (most requests)
        if len(body) > pl.max_body:
            return Refused(too_large(pl))
    else:
        read = await _read_body(pl, request)
        if type(read) is not bytes:  # (not isinstance: web.Response is an ABC, slow to check)
            return Refused(cast(web.Response, read))
        body = read
    h = request.headers
    encoding = h.get("Content-Encoding")
    decoded = False
    if encoding is not None and body:
        taken = await _decode(pl, request, body, encoding, path_qs(upstream_path, query), rec, t0)
        if type(taken) is not bytes:
            return cast(Refused | Opaque, taken)
        body, decoded = taken, True
    idem = h.get("Idempotency-Key")
    try:  # a bad cache header (BadCacheHeader) or body (BadBody): a 4xx
        controls, caller = read_controls(h)
        args = (pl, request, route, query, controls, caller, idem, body)
        memo = _planned(*args) if len(body) <= OFF_LOOP_BYTES else await _planned_large(*args)
    except BadBody as exc:
        return Refused(json_error(exc.status, str(exc), "invalid_request_error", exc.code))
    rec.namespace = controls.namespace or None
    plan, tenant, rec.tenant = memo
    rec.rule = plan.rule.label if plan.rule is not None else "other"
    rec.model = plan.model
    rec.stream = plan.stream
    if plan.caller:
        caller_fields(request, rec.extra, plan.caller, caller)
    return Intake(
        request,
        body,
        decoded,
        route,
        upstream_path,
        query,
        controls,
        caller,
        idem,
        plan,
        tenant,
        t0,
    )


def _bad_target() -> web.Response:
    """400 for an absolute-form (`POST http://host/...`) or asterisk-form target: the proxy
    is no forward proxy, and gluing such a target to the upstream's path makes nonsense."""
    resp = json_error(
        400, "The request target must be a path.", "invalid_request_error", "bad_target"
    )
    resp.force_close()
    return resp


async def _decode(
    pl: Planner,
    request: web.BaseRequest,
    body: bytes,
    encoding: str,
    upstream_path_qs: str,
    rec: Record,
    t0: float,
) -> bytes | Refused | Opaque:
    """The body decoded from its Content-Encoding (capped while decoding), a 4xx, or Opaque
    for a coding the proxy cannot read (forwarded as it came, never keyed)."""
    h = request.headers
    if not decodable(encoding):
        rec.tenant = None
        return Opaque(Forward(request, body, forward_headers(h), upstream_path_qs, t0))
    try:
        return await off_loop(pl.workers, len(body), decode, body, encoding, pl.max_body)
    except BodyTooLarge:
        return Refused(too_large(pl))
    except BadBody as exc:
        return Refused(json_error(400, str(exc), "invalid_request_error", exc.code))


async def _read_body(pl: Planner, request: web.BaseRequest) -> bytes | web.Response:
    """A body still to come, capped at max_body (413), `Expect: 100-continue` answered first."""
    length = request.content_length
    if length is not None and length > pl.max_body:
        return too_large(pl)
    if request.headers.get("Expect"):
        refused = await _expect(request)
        if refused is not None:
            return refused
    content = request.content
    if content.is_eof():
        body = content.read_nowait()
        return too_large(pl) if len(body) > pl.max_body else body
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return too_large(pl)


def _planned(
    pl: Planner,
    request: web.BaseRequest,
    route: str,
    query: str,
    controls: ClientControls,
    caller: CallerControls,
    idem: str | None,
    body: bytes,
) -> tuple[Plan, bytes, str]:
    """The request's (Plan, tenant digest, tenant id), memoised on a keyed digest of the raw
    request: for a small body, on the loop (no coroutine: a HIT's 3 %)."""
    parts = _memo_parts(request, route, query, controls, caller, idem)
    raw, creds = request_digest(pl.mac_key, request.headers, parts, body)
    memo = pl.plans.get(raw)
    if memo is None:
        tenant = tenant_digest(pl.mac_key, *creds)
        scope = Scope(pl.secret, tenant, request.method, route, query)
        ctype = request.headers.get("Content-Type", "")
        plan = make_plan(
            pl.rules, scope, controls.namespace, ctype, body, fingerprint=bool(idem), caller=caller
        )
        memo = _memoise(pl, raw, plan, tenant)
    return memo


async def _planned_large(
    pl: Planner,
    request: web.BaseRequest,
    route: str,
    query: str,
    controls: ClientControls,
    caller: CallerControls,
    idem: str | None,
    body: bytes,
) -> tuple[Plan, bytes, str]:
    """_planned for a body over OFF_LOOP_BYTES: hashed and planned off the loop (and, over
    PROCESS_BYTES, in a worker process)."""
    parts = _memo_parts(request, route, query, controls, caller, idem)
    raw, creds = await off_loop(
        pl.workers, len(body), request_digest, pl.mac_key, request.headers, parts, body
    )
    memo = pl.plans.get(raw)
    if memo is None:
        tenant = tenant_digest(pl.mac_key, *creds)
        ctype = request.headers.get("Content-Type", "")
        scope = Scope(pl.secret, tenant, request.method, route, query)
        args = (pl.rules, scope, controls.namespace, ctype)
        if len(body) <= PROCESS_BYTES:
            plan = await off_loop(
                pl.workers, len(body), make_plan, *args, body, fingerprint=bool(idem), caller=caller
            )
        else:
            plan = await _plan_large(pl, args, body, bool(idem), caller)
        memo = _memoise(pl, raw, plan, tenant)
    return memo


def _memo_parts(
    request: web.BaseRequest,
    route: str,
    query: str,
    controls: ClientControls,
    caller: CallerControls,
    idem: str | None,
) -> tuple[str, ...]:
    """What the plan memo keys on beside the credentials and the body (keys.request_digest;
    the memo holds plans with a fingerprint, for an Idempotency-Key, apart from those
    without)."""
    return (
        request.method,
        route,
        query,
        controls.namespace,
        request.headers.get("Content-Type", ""),
        "i" * bool(idem),
        caller.memo,
    )


def _memoise(pl: Planner, raw: bytes, plan: Plan, tenant: bytes) -> tuple[Plan, bytes, str]:
    """Keep a plan (the memo is emptied when full)."""
    if len(pl.plans) >= PLAN_MEMO_MAX:
        pl.plans.clear()
    memo = pl.plans[raw] = (plan, tenant, tenant.hex()[:12])
    return memo


async def _plan_large(
    pl: Planner, args: tuple[Any, ...], body: bytes, fingerprint: bool, caller: CallerControls
) -> Plan:
    """make_plan for a body over PROCESS_BYTES, in a worker process, so parsing it holds no
    lock this process's loop needs; on State.cpu if the workers cannot be had."""
    loop = asyncio.get_running_loop()
    call: Callable[[], Plan] = partial(
        cast(Any, make_plan), *args, body, fingerprint=fingerprint, caller=caller
    )
    pool = await pl.workers.parser_pool()
    if pool is not None:
        try:
            return await loop.run_in_executor(pool, call)
        except BrokenProcessPool:
            log.warning("parsers.broken")
            pl.workers.parsers_broken()
    return await loop.run_in_executor(pl.workers.cpu, call)


async def _expect(request: web.BaseRequest) -> web.Response | None:
    """Answer `Expect: 100-continue` as a server does (the header never goes upstream)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return json_error(
            417, "Only Expect: 100-continue is supported.", "invalid_request_error", None
        )
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer
    return None


def too_large(pl: Planner) -> web.Response:
    """413, and the connection closed: the unread rest of the body must not be taken for the
    next request."""
    resp = json_error(
        413,
        f"Request body too large: the limit is {pl.max_body_mb:g} MB.",
        "invalid_request_error",
        "request_too_large",
    )
    resp.force_close()
    return resp


def route_of(path: str) -> tuple[str, str]:
    """(route for rules, path for upstream). Accepts paths with or without the /v1 prefix."""
    if path.startswith("/v1/") or path == "/v1":
        return path, path
    if path.startswith("/openai/"):
        if path.startswith("/openai/v1/"):
            return path[len("/openai") :], path  # Azure v1: same routes as OpenAI
        return path, path  # Azure classic: /openai/deployments/{name}/...
    return "/v1" + path, "/v1" + path


def path_qs(upstream_path: str, query: str) -> str:
    """The upstream path and query."""
    return upstream_path + ("?" + query if query else "")


def onward(pl: Planner, intake: Intake, rec: Record) -> tuple[Forward, PassThrough | Keyed]:
    """What becomes of a request not answered by the hot fast path: the request as it goes
    upstream (forward_of), and plan.decide's decision for it (decision)."""
    return forward_of(intake, rec), decision(pl, intake)


def forward_of(intake: Intake, rec: Record) -> Forward:
    """The request as it goes upstream: its body (with the rule's prompt_cache_key), its
    headers filtered, the upstream path."""
    body = intake.body
    plan = intake.plan
    if plan.prompt_cache_key is not None:  # the rule's prompt_cache_key = "auto"
        body = with_prompt_cache_key(body, plan.prompt_cache_key)
        rec.extra["prompt_cache_key"] = "auto"
    request = intake.request
    headers = forward_headers(request.headers, decoded=intake.decoded)
    return Forward(request, body, headers, path_qs(intake.upstream_path, intake.query), intake.t0)


def decision(pl: Planner, intake: Intake) -> PassThrough | Keyed:
    """plan.decide for this request: its Cache-Control, and its Idempotency-Key if any."""
    plan, idem = intake.plan, intake.idem
    idempotency = None
    if idem:
        tenant, query = intake.tenant, intake.query
        fingerprint = plan.fingerprint or passthrough_fingerprint(
            pl.secret, tenant, intake.request.method, intake.route, query, intake.body
        )
        key = idempotency_key(pl.secret, tenant, idem, intake.controls.namespace)
        idempotency = (key, fingerprint)
    return decide(
        plan,
        intake.controls,
        idempotency=idempotency,
        idempotency_ttl_s=pl.idempotency_ttl_s,
    )

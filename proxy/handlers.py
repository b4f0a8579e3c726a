"""The data path, top to bottom.

request -> body (size-capped) -> tenant -> Plan (rule, key; memoised on the raw bytes)
  -> no rule / no-store: pass-through, streamed both ways
  -> cache lookup: HIT -> replay the stored bytes
  -> flight for the key: join it (COALESCED) or lead one (MISS / REFRESH), whose upstream read
     runs in its own task (or, for a whole chat answer, in the leading handler); every
     reader relays the flight from its first chunk, then live
  -> one `request.done` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from types import CoroutineType
from typing import Any, NamedTuple, TypeVar, assert_never, cast

import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy import sse
from proxy.answers import answer_cost, usage_of_json
from proxy.auth import CredentialCheck
from proxy.body import decodable, decode
from proxy.bus import LOCAL, Conflict, Follow, Leader, Leadership, Local, RedisBus
from proxy.cache import Cache
from proxy.caller_keys import (
    NO_CALLER,
    BadCacheHeader,
    CallerControls,
    caller_fields,
    read_caller,
)
from proxy.coalesce import COMPLETE, CUT, Flight, Flights, Reader
from proxy.embeddings import ItemFlights, serve_items
from proxy.errors import (
    BadBody,
    BodyTooLarge,
    Lagged,
    NotConvertible,
    StoreUnavailable,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    failure_answer,
)
from proxy.fetch import Fetcher, FetchJob, Transform
from proxy.images.base import PLACEHOLDER_BASE, client_base, rebase
from proxy.images.rehost import ImageRehoster, rewrites, transform_for
from proxy.keys import credential_of, header_values, key_id, raw_digest, tenant_digest
from proxy.log import RequestLog
from proxy.models import CLOCK, CachedResponse, money_fields
from proxy.plan import (
    DEFAULT_CONTROLS,
    ClientControls,
    Keyed,
    Mode,
    PassThrough,
    Plan,
    bounded,
    decide,
    idempotency_key,
    make_plan,
    parse_cache_control,
    passthrough_fingerprint,
    route_of,
    with_caller,
)
from proxy.prompt_cache import with_prompt_cache_key
from proxy.record import Record
from proxy.replay import age_of, is_fast, replay, whole, whole_in_pieces
from proxy.rules import Rules
from proxy.semantic import text_of
from proxy.settings import Settings
from proxy.stats import Shared, Stats
from proxy.status import (
    BYPASS,
    COALESCED,
    HIT,
    HIT_CACHE_STATUS,
    MISS,
    REFRESH,
    STALE,
    CacheStatus,
    semantic_hit,
    stale,
)
from proxy.tasks import spawn
from proxy.twins import convert
from proxy.upstream import Upstream, forward_headers, response_headers
from proxy.vectors import Probe, Semantic

log = structlog.get_logger()
T = TypeVar("T")
LOOKUP, REFRESH_MODE = Mode.LOOKUP, Mode.REFRESH  # module names: see coalesce.PENDING

PLAN_MEMO_MAX = 20_000
WHOLE_MAX = 1024 * 1024
"""Answers up to this size are handed to aiohttp whole; larger ones are written piece by piece
under the write timeout, so a client that reads nothing pins at most a socket buffer's worth."""
PROXY_FAILURES = frozenset({"upstream_unreachable", "upstream_timeout", "proxy_failure"})
"""A flight's reason when the proxy answered for a failed upstream (logged as `error`)."""
ROUTE_MAX = 256
"""Longest route copied into a log line or an entry (the key covers the whole path)."""
OFF_LOOP_BYTES = 64 * 1024
"""Bodies larger than this are decoded, hashed and parsed on State.cpu, not on the loop."""
PROCESS_BYTES = 1024 * 1024
"""Bodies larger than this are planned (parsed) in a worker process: a JSON parser holds the
GIL, so on a thread it would stall the loop as long as it parses (about 0.5 s for 15 MB of
nested arrays), and every other client with it."""
PARSERS = 2
"""Worker processes for large bodies (started on the first one)."""
COUNT_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class State:
    """Everything the handler needs, built once by create_app."""

    settings: Settings
    rules: Rules
    secret: bytes
    mac_key: bytes
    """Key of the per-request BLAKE2b digests (tenant, raw body), derived from `secret`."""
    cache: Cache
    upstream: Upstream
    flights: Flights
    fetcher: Fetcher
    stats: Stats
    plans: dict[bytes, tuple[Plan, bytes, str]] = field(default_factory=dict)
    """Memo: raw request digest -> (plan, tenant digest, tenant id for logs)."""
    converted: dict[tuple[str, float, str], bytes] = field(default_factory=dict)
    """Twins converted to the other form, newest last (see _twin)."""
    shared: Shared | None = None
    """With --workers N: every worker's counters (stats, metrics and the dashboard add up)."""
    auth: CredentialCheck | None = None
    """Re-checks credentials before serving them cached answers."""
    bus: RedisBus | None = None
    """Cross-instance flights (with a Redis store)."""
    rehoster: ImageRehoster | None = None
    """Copies image URLs in answers to the image store."""
    semantic: Semantic | None = None
    """The semantic layer (rules with `semantic` on or shadow)."""
    log: RequestLog = field(default_factory=RequestLog)
    """Where request.done lines go (the app's log sink)."""
    transform: Transform | None = None
    max_body: int = 0
    """settings.max_body_bytes, computed once."""
    cpu: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="request-cpu")
    )
    """Where large bodies are decoded, hashed and parsed (see OFF_LOOP_BYTES)."""
    parsers: ProcessPoolExecutor | None = None
    """Where bodies over PROCESS_BYTES are planned (see _plan_large); started on first use."""
    _parsers_starting: asyncio.Future[ProcessPoolExecutor | None] | None = None

    async def parser_pool(self) -> ProcessPoolExecutor | None:
        """The worker processes that plan large bodies, started (off the loop) on first use;
        None if they cannot be started (large bodies are then planned on State.cpu)."""
        if self.parsers is not None:
            return self.parsers
        if self._parsers_starting is None:
            self._parsers_starting = asyncio.ensure_future(asyncio.to_thread(_start_parsers))
        pool = await asyncio.shield(self._parsers_starting)
        if self.parsers is None:
            self.parsers = pool
        return pool

    def parsers_broken(self) -> None:
        """A worker died (killed, out of memory): the next large body starts new ones."""
        pool, self.parsers, self._parsers_starting = self.parsers, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close_parsers(self) -> None:
        if self.parsers is not None:
            self.parsers.shutdown(wait=False, cancel_futures=True)

    items: ItemFlights = field(default_factory=ItemFlights)
    """Embeddings input items being fetched (embeddings.py)."""

    def __post_init__(self) -> None:
        self.max_body = self.settings.max_body_bytes
        if self.rehoster is not None:
            self.transform = transform_for(self.rehoster)


class Exchange(NamedTuple):
    """One client request as the data path forwards it."""

    request: web.BaseRequest
    body: bytes
    """As read (and decoded from its Content-Encoding)."""
    fwd: CIMultiDict[str]
    """The headers that go upstream."""
    path_qs: str
    """The upstream path and query."""
    t0: float
    """When the request arrived (time.perf_counter)."""


def json_error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type_, code),
        content_type="application/json",
    )


async def proxy_handler(st: State, request: web.BaseRequest) -> web.StreamResponse:
    """Answer from the cache or from upstream; log one line."""
    t0 = time.perf_counter()
    raw_path, _, query = request.raw_path.partition("?")
    route, upstream_path = route_of(raw_path)
    rec = Record(bounded(route, ROUTE_MAX), bounded(request.method, 16))
    resp: web.StreamResponse | None = None
    try:
        handled = await _handle(st, request, route, upstream_path, query, rec, t0)
        # (types, not isinstance: StreamResponse is a MutableMapping, an ABC, slow to check)
        if type(handled) is CoroutineType:
            resp = await cast(Coroutine[Any, Any, web.StreamResponse], handled)
        else:
            resp = cast(web.StreamResponse, handled)
        return resp
    finally:
        duration = (time.perf_counter() - t0) * 1000.0
        status = resp.status if resp is not None else 499
        nbytes = rec.bytes
        if nbytes is None:
            body = resp.body if type(resp) is web.Response else None
            if isinstance(body, bytes):
                nbytes = len(body)
            else:
                nbytes = resp.body_length if resp is not None else 0
        rec.status = status
        rec.bytes = nbytes
        rec.duration_ms = duration = round(duration, 2)
        if rec.ttfb_ms is None:
            rec.ttfb_ms = duration
        after = rec.after
        if after is None or after.done():
            _done(st, rec, duration)
        else:  # a shadow semantic lookup still runs: its fields belong on this line
            after.add_done_callback(lambda _: _done(st, rec, duration))


def _done(st: State, rec: Record, duration: float) -> None:
    """The request's line, rendered once, and the counters behind /_proxy/stats."""
    line = rec.fields()
    st.stats.record(line, duration / 1000.0)
    st.log.done(line)


async def _handle(
    st: State,
    request: web.BaseRequest,
    route: str,
    upstream_path: str,
    query: str,
    rec: Record,
    t0: float,
) -> web.StreamResponse | Coroutine[Any, Any, web.StreamResponse]:
    """The answer, or the coroutine that makes it (keyed or passed through), which
    proxy_handler awaits: this frame and its locals are gone while a long answer is relayed
    (a stream holds a few hundred bytes less)."""
    settings = st.settings
    h = request.headers
    if request.raw_path[:1] != "/":
        # An absolute-form (`POST http://host/...`) or asterisk-form target: the proxy is no
        # forward proxy, and gluing such a target to the upstream's path makes nonsense.
        resp = json_error(
            400, "The request target must be a path.", "invalid_request_error", "bad_target"
        )
        resp.force_close()
        return resp
    length = request.content_length
    if length is not None and length > st.max_body:
        return _too_large(settings)
    if h.get("Expect"):
        refused = await _expect(request)
        if refused is not None:
            return refused
    content = request.content
    if content.is_eof():  # the whole body came with the head (most requests): take it as is
        body = content.read_nowait()
        if len(body) > st.max_body:
            return _too_large(settings)
    else:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large(settings)

    encoding = h.get("Content-Encoding")
    decoded = False
    if encoding is not None and body:
        if decodable(encoding):
            try:
                body = await _off_loop(st, len(body), decode, body, encoding, st.max_body)
            except BodyTooLarge:
                return _too_large(settings)
            except BadBody as exc:
                return json_error(400, str(exc), "invalid_request_error", exc.code)
            decoded = True
        else:
            # Not a coding the proxy can read: forward it as it came, never keyed.
            rec.tenant = None
            ex = Exchange(request, body, forward_headers(h), _path_qs(st, upstream_path, query), t0)
            return _passthrough(st, ex, rec)

    credential = credential_of(h)
    org = header_values(h, "OpenAI-Organization")
    project = header_values(h, "OpenAI-Project")
    cache_control = h.getall("Cache-Control", None)
    controls = parse_cache_control(
        ",".join(cache_control) if cache_control else None, h.get("X-Cache-Namespace")
    )
    try:
        caller = read_caller(h)
    except BadCacheHeader as exc:
        return json_error(400, str(exc), "invalid_request_error", exc.code)
    if caller is not NO_CALLER:
        controls = with_caller(controls, caller)
    method = request.method
    ctype = h.get("Content-Type", "")
    if controls.namespace:
        rec.namespace = bounded(controls.namespace)

    idem = h.get("Idempotency-Key")
    # the memo holds plans with a fingerprint (Idempotency-Key) apart from those without
    head = "\0".join(
        (
            credential,
            org,
            project,
            method,
            route,
            query,
            controls.namespace,
            ctype,
            "i" * bool(idem),
            caller.memo,
        )
    )
    if len(body) > OFF_LOOP_BYTES:
        raw = await _off_loop(st, len(body), raw_digest, st.mac_key, head, body)
    else:
        raw = raw_digest(st.mac_key, head, body)
    memo = st.plans.get(raw)
    if memo is None:
        tenant = tenant_digest(st.mac_key, credential, org, project)
        try:
            args = (st.rules, st.secret, tenant, method, route, query, controls.namespace, ctype)
            if len(body) <= OFF_LOOP_BYTES:  # no coroutine for the common case (see _off_loop)
                plan = make_plan(*args, body, fingerprint=bool(idem), caller=caller)
            elif len(body) <= PROCESS_BYTES:
                plan = await _off_loop(
                    st, len(body), make_plan, *args, body, fingerprint=bool(idem), caller=caller
                )
            else:
                plan = await _plan_large(st, args, body, bool(idem), caller)
        except BadBody as exc:
            return json_error(exc.status, str(exc), "invalid_request_error", exc.code)
        if len(st.plans) >= PLAN_MEMO_MAX:
            st.plans.clear()
        memo = st.plans[raw] = (plan, tenant, tenant.hex()[:12])
    plan, tenant, rec.tenant = memo
    rec.rule = plan.rule.label if plan.rule is not None else "other"
    rec.model = plan.model
    rec.stream = plan.stream
    if plan.caller:
        caller_fields(request, rec.extra, plan.caller, caller)

    if controls is DEFAULT_CONTROLS and plan.rule is not None and not idem:
        # The cache-hit fast path: a hot entry, sent whole.
        entry = st.cache.peek(plan.key)
        if (
            entry is not None
            and entry.fresh_until >= CLOCK.now()
            and (not plan.form or plan.form == entry.form)
            and (not entry.stream or plan.rule.replay == "fast")
            and len(entry.body) <= WHOLE_MAX
            and (st.auth is None or st.auth.fresh(tenant))
        ):
            rec.cache = HIT
            rec.key = key_id(plan.key)
            rec.bytes = len(entry.body)
            _saved(rec, entry)
            return _as_stored(request, entry, HIT, HIT_CACHE_STATUS)

    up_body = body
    if plan.prompt_cache_key is not None:  # the rule's prompt_cache_key = "auto"
        up_body = with_prompt_cache_key(body, plan.prompt_cache_key)
        rec.extra["prompt_cache_key"] = "auto"
    ex = Exchange(
        request,
        up_body,
        forward_headers(h, decoded=decoded),
        _path_qs(st, upstream_path, query),
        t0,
    )
    idempotency = None
    if idem:
        fingerprint = plan.fingerprint or passthrough_fingerprint(
            st.secret, tenant, method, route, query, body
        )
        key = idempotency_key(st.secret, tenant, idem, controls.namespace)
        idempotency = (key, fingerprint)
    what = decide(
        plan, controls, idempotency=idempotency, idempotency_ttl_s=settings.idempotency_ttl_s
    )
    match what:
        case Keyed() if plan.per_item and not idem:
            return serve_items(st, ex, rec, plan, tenant, what)  # embeddings, item by item
        case Keyed():
            return _serve_keyed(st, ex, rec, plan, tenant, what)
        case PassThrough():
            return _passthrough(st, ex, rec, plan)
        case _:
            assert_never(what)


def _path_qs(st: State, upstream_path: str, query: str) -> str:
    return upstream_path + ("?" + query if query else "")


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


async def _off_loop(st: State, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU-bound request work (decoding, hashing, parsing) off the event loop when the
    body is large, on a small pool, so one huge or hostile body never stalls other requests."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(st.cpu, partial(fn, *args, **kwargs))


async def _plan_large(
    st: State, args: tuple[Any, ...], body: bytes, fingerprint: bool, caller: CallerControls
) -> Plan:
    """make_plan for a body over PROCESS_BYTES, in a worker process, so parsing it holds no
    lock this process's loop needs; on State.cpu if the workers cannot be had."""
    loop = asyncio.get_running_loop()
    call: Callable[[], Plan] = partial(
        cast(Any, make_plan), *args, body, fingerprint=fingerprint, caller=caller
    )
    pool = await st.parser_pool()
    if pool is not None:
        try:
            return await loop.run_in_executor(pool, call)
        except BrokenProcessPool:
            log.warning("parsers.broken")
            st.parsers_broken()
    return await loop.run_in_executor(st.cpu, call)


def _start_parsers() -> ProcessPoolExecutor | None:
    """PARSERS worker processes, each started and ready (run on a thread: starting a process
    blocks). Spawned, not forked: this process has threads."""
    try:
        pool = ProcessPoolExecutor(
            PARSERS, mp_context=multiprocessing.get_context("spawn"), initializer=_yield_cpu
        )
        for ready in [pool.submit(_ready) for _ in range(PARSERS)]:
            ready.result(timeout=60)
    except Exception as exc:
        log.warning("parsers.unavailable", error=f"{type(exc).__name__}: {exc}"[:200])
        return None
    return pool


def _yield_cpu() -> None:
    """In each worker: a lower CPU priority, so that on a busy machine the event loop (and
    every small request) goes first, and large bodies wait."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)


def _ready() -> None:
    """A no-op run in each new worker process, to start them all before they are needed."""
    time.sleep(0.05)  # (long enough that every worker takes one)


def _too_large(settings: Settings) -> web.Response:
    resp = json_error(
        413,
        f"Request body too large: the limit is {settings.max_body_mb:g} MB.",
        "invalid_request_error",
        "request_too_large",
    )
    resp.force_close()  # the unread rest of the body must not be taken for the next request
    return resp


async def _serve_keyed(
    st: State, ex: Exchange, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> web.StreamResponse:
    """A request with a key: answer from the cache, join a flight, or lead one."""
    request = ex.request
    key, fingerprint, controls = keyed.key, keyed.fingerprint, keyed.controls
    rule = plan.rule
    rec.key = key_id(key)
    degraded = False
    stale: Stale | None = None
    if controls.mode is LOOKUP:
        entry = st.cache.peek(key)
        if entry is None and not st.cache.in_memory:  # (in memory, peek was the lookup)
            try:
                entry = await st.cache.get(key)
            except StoreUnavailable:
                degraded = True
        if entry is not None:
            if fingerprint and entry.meta.get("fingerprint") != fingerprint:
                return _idempotency_conflict()
            now = CLOCK.now()
            age = now - entry.created
            fresh = now <= entry.fresh_until
            window = controls.stale_window(rule.stale_if_error_s if rule is not None else 0.0)
            if not fresh and window > 0 and now <= entry.fresh_until + window:
                # served only if the upstream fails for this request
                stale = Stale(key, entry, plan)
            if fresh and (controls.max_age is None or age <= controls.max_age):
                refused = await _auth_refusal(st, tenant, request, rec)
                if refused is not None:
                    return refused
                served = await _serve_entry(st, request, rec, key, entry, plan, HIT_CACHE_STATUS)
                if served is not None:
                    return served
                # not convertible: fetched again below, in the form asked for
    elif controls.mode is REFRESH_MODE and not st.cache.healthy:
        degraded = True

    coalesce = rule.coalesce if rule is not None else True
    lock_timeout = rule.lock_timeout_s if rule is not None else 30.0
    # Twins share the store key, never a flight: a streamed and a non-streamed request in
    # flight at once each go upstream (a live stream is not converted half-way). But an
    # Idempotency-Key names one request in every form: one flight, which another form waits
    # for whole, then gets converted (_join_form).
    fkey = f"{key}#{plan.form}" if plan.twin and not fingerprint else key
    flight = st.flights.get(fkey) if coalesce else None
    semantic = (
        rule.semantic
        if rule is not None
        and plan.semantic is not None
        and st.semantic is not None
        and controls.mode is LOOKUP
        and not degraded
        and not fingerprint
        else "off"
    )
    probe: Probe | None = None
    if flight is None and semantic == "on":
        probe = await _probe(st, ex, rec, plan, tenant, controls)
        if probe.hit and probe.entry is not None:
            refused = await _auth_refusal(st, tenant, request, rec)
            if refused is not None:
                return refused
            served = await _serve_entry(
                st, request, rec, probe.member, probe.entry, plan, semantic_hit(probe.score or 0.0)
            )
            if served is not None:
                rec.extra["semantic_key"] = key_id(probe.member)
                return served
        flight = st.flights.get(fkey) if coalesce else None  # one may have started meanwhile
    if flight is not None:
        if fingerprint and flight.fingerprint != fingerprint:
            return _idempotency_conflict()
        if flight.form != plan.form:
            return await _join_form(st, ex, rec, flight, plan, key, lock_timeout)
        return await _join(st, ex, rec, flight, flight.attach(), lock_timeout, stale)

    label = BYPASS if degraded else (REFRESH if controls.mode is REFRESH_MODE else MISS)
    rec.cache = label
    flight = st.flights.lead(
        fkey, max_bytes=int(st.settings.max_record_mb * 1024 * 1024), fingerprint=fingerprint
    )
    flight.form = plan.form
    if not coalesce:
        st.flights.forget(flight)
    shadow: asyncio.Task[Probe] | None = None
    job = FetchJob(
        method=request.method,
        path_qs=ex.path_qs,
        headers=ex.fwd,
        body=ex.body,
        route=rec.route,
        stream=plan.stream,
        store_key=key if keyed.store and not degraded else "",
        ttl_s=keyed.ttl_s,
        keep_s=keyed.keep_s,
        debounce_s=rule.debounce_s if rule is not None else 0.0,
        transform=st.transform
        if rule is not None and rule.rehost_images and rewrites(rec.route)
        else None,
        meta={
            "fingerprint": fingerprint,
            "model": plan.model,
            "route": rec.route,
            "hints": plan.hints,
        },
        public_base=st.settings.public_url or PLACEHOLDER_BASE,
    )
    if semantic != "off" and keyed.store and not degraded:
        if probe is None:  # shadow: the lookup runs beside the upstream call
            shadow = spawn(_probe(st, ex, rec, plan, tenant, controls), name="semantic-shadow")
        job.on_stored = partial(_remember, st, plan, probe, shadow, key)
    reader = flight.attach()
    bus = st.bus if coalesce and not degraded else None
    fed = inline = False
    try:  # whatever happens before a feeder starts, the flight must not stay registered
        lead: Leadership = LOCAL if bus is None else await bus.lead(fkey, fingerprint, plan.form)
        match lead:
            case Conflict():
                return _idempotency_conflict()
            case Follow(form=form):
                assert bus is not None
                if fingerprint and form != plan.form:
                    # another form of this request is led elsewhere: whole, then converted
                    flight.form = form or "?"
                    job.stream = False  # (its form is read from its head)
                    reader.close()
                    st.fetcher.follow(bus, flight, job)
                    fed = True
                    return await _join_form(st, ex, rec, flight, plan, key, lock_timeout)
                st.fetcher.follow(bus, flight, job)  # another instance leads: follow it
                fed = True
                return await _join(st, ex, rec, flight, reader, lock_timeout, stale)
            case Leader(token=token):
                assert bus is not None
                st.fetcher.lead_shared(bus, flight, job, token)
            case Local():
                # A streamed answer is read by its own task, at the upstream's pace whatever
                # this client's. A chat or Responses answer asked for whole (a JSON object,
                # bounded by the model's output) is read by this handler, which saves a task
                # per MISS; other whole answers (speech, embeddings) can be large: they are
                # relayed live, from their own task.
                inline = not plan.stream and plan.twin is not None
                if not inline:
                    st.fetcher.start(flight, job)
            case _:
                assert_never(lead)
        fed = True
    finally:
        if not fed:
            reader.close()
            flight.finish(CUT, "no upstream read was started")
            st.flights.forget(flight)
    if inline:
        flight.task = asyncio.current_task()
        flight.whole = True
        st.fetcher.keep(flight, job, await st.fetcher.fetch(flight, job))
    if flight.head is None and not flight.done:  # (an inline read has it already)
        await flight.wait_head(None)
    if stale is not None and failed(flight):
        served = await _serve_stale(st, ex, rec, flight, stale)
        if served is not None:
            reader.close()
            return served
    resp = await _relay(request, rec, flight, reader, label, ex.t0, st.settings.write_timeout_s)
    rec.upstream_ms = round(flight.upstream_ms, 2) or None
    if st.auth is not None and flight.head is not None and flight.head.status < 300:
        st.auth.seen(tenant)
    if flight.entry is not None:
        rec.extra.update(money_fields(flight.entry.meta.get("cost"), saved=False))
    if shadow is not None and not shadow.done():
        rec.after = shadow  # the answer goes now; its line when the lookup is done
    return resp


async def _join(
    st: State,
    ex: Exchange,
    rec: Record,
    flight: Flight,
    reader: Reader,
    lock_timeout: float,
    stale: Stale | None = None,
) -> web.StreamResponse:
    """Answer with a flight someone else leads (here or on another instance)."""
    head = await flight.wait_head(lock_timeout)
    if head is None and not flight.done:
        # The leader hangs: go upstream ourselves, uncached (nginx proxy_cache_lock_timeout).
        reader.close()
        rec.lock_timeout = True
        return await _passthrough(st, ex._replace(t0=time.perf_counter()), rec)
    if stale is not None and failed(flight):
        served = await _serve_stale(st, ex, rec, flight, stale)
        if served is not None:
            reader.close()
            return served
    rec.cache = COALESCED
    resp = await _relay(
        ex.request, rec, flight, reader, COALESCED, ex.t0, st.settings.write_timeout_s
    )
    if flight.entry is not None:
        _saved(rec, flight.entry)
    return resp


async def _join_form(
    st: State,
    ex: Exchange,
    rec: Record,
    flight: Flight,
    plan: Plan,
    key: str,
    lock_timeout: float,
) -> web.StreamResponse:
    """Answer with an Idempotency-Key flight led for another form of this request: once it
    is whole, its stored answer converted to this form (_serve_entry); a failure as it came
    (errors are JSON in every form); a cut answer is fetched again, unstored."""
    head = await flight.wait_head(lock_timeout)
    if head is None and not flight.done:
        rec.lock_timeout = True
        return await _passthrough(st, ex._replace(t0=time.perf_counter()), rec)
    while not flight.done:
        await flight.changed()
    await asyncio.sleep(0)  # the leader stores a small answer as soon as its flight ends
    entry = flight.entry
    head = flight.head
    if entry is None and head is not None and head.status < 300:
        with contextlib.suppress(StoreUnavailable):  # (a large answer is stored by a task)
            entry = await st.cache.get(key)
    if entry is not None and entry.meta.get("fingerprint") == flight.fingerprint:
        served = await _serve_entry(st, ex.request, rec, key, entry, plan, HIT_CACHE_STATUS)
        if served is not None:
            rec.cache = COALESCED
            served.headers["X-Cache-Status"] = COALESCED.header
            served.headers["Cache-Status"] = COALESCED.rfc9211
            return served
    if head is not None and head.status >= 300 and flight.outcome is COMPLETE:
        return await _relay(
            ex.request, rec, flight, flight.attach(), COALESCED, ex.t0, st.settings.write_timeout_s
        )
    return await _passthrough(st, ex._replace(t0=time.perf_counter()), rec)


async def _probe(
    st: State,
    ex: Exchange,
    rec: Record,
    plan: Plan,
    tenant: bytes,
    controls: ClientControls,
) -> Probe:
    """One semantic lookup; its fields go on the request's line."""
    assert st.semantic is not None and plan.rule is not None and plan.twin is not None
    request = ex.request
    text = await _off_loop(st, len(ex.body), text_of, plan.twin, ex.body)
    probe = await st.semantic.probe(
        plan,
        text,
        tenant=tenant,
        namespace=controls.namespace,
        headers=request.headers,
        route=rec.route,
        query=request.query_string,
        max_age=controls.max_age,
    )
    rec.extra["semantic"] = plan.rule.semantic
    rec.extra.update(probe.fields())
    if probe.member:
        rec.extra["semantic_key"] = key_id(probe.member)
    return probe


async def _remember(
    st: State,
    plan: Plan,
    probe: Probe | None,
    shadow: asyncio.Task[Probe] | None,
    key: str,
    entry: CachedResponse,
) -> None:
    """A stored MISS: index it under its request's vector, for later paraphrases."""
    assert st.semantic is not None
    if probe is None and shadow is not None:
        probe = await asyncio.shield(shadow)
    if probe is not None:
        await st.semantic.remember(plan, probe, key, entry.fresh_until)


async def _auth_refusal(
    st: State, tenant: bytes, request: web.BaseRequest, rec: Record
) -> web.Response | None:
    """The upstream's refusal of a credential not checked lately (auth.py), else None."""
    if st.auth is None or st.auth.fresh(tenant):
        return None
    refusal = await st.auth.check(tenant, request.headers)
    if refusal is None:
        return None
    rec.auth_refused = True
    refused = web.Response(status=refusal.status, body=refusal.body)
    refused.headers.extend(refusal.headers)
    return refused


async def _serve_entry(
    st: State,
    request: web.BaseRequest,
    rec: Record,
    key: str,
    entry: CachedResponse,
    plan: Plan,
    cache_status: str,
    label: CacheStatus = HIT,
) -> web.StreamResponse | None:
    """How a stored answer becomes this client's answer, for every path that serves one (a
    HIT, a semantic HIT, a STALE answer; the fast path is its sync subset, _as_stored): the
    form this request wants (a twin converted), image links rebased for this client, whole,
    in pieces or paced. None when it cannot be given in that form (it is fetched again)."""
    rule = plan.rule
    if plan.form and plan.form != entry.form:
        if entry.form == "sse" and plan.twin == "chat":
            # A chat stream stored without its usage chunk cannot give the usage a JSON
            # answer or an include_usage stream must carry: fetched again (and replaced).
            rec.extra["twin_skipped"] = "no_usage"
            return None
        converted = await _twin(st, rec, key, entry, plan, cache_status, label)
        if converted is None:
            return None
        rec.cache = label
        _saved(rec, entry)
        return converted
    rec.cache = label
    _saved(rec, entry)
    if entry.rebase or (is_fast(entry, rule) and len(entry.body) <= WHOLE_MAX):
        return _as_stored(request, entry, label, cache_status)
    if is_fast(entry, rule):
        wt = st.settings.write_timeout_s
        return await whole_in_pieces(request, entry, label, cache_status, wt)
    return await replay(request, entry, rule, label, cache_status)


def _as_stored(
    request: web.BaseRequest, entry: CachedResponse, label: CacheStatus, cache_status: str
) -> web.Response:
    """A stored answer in its stored form, sent whole: image links rebased for this client."""
    if entry.rebase:
        return whole(entry, label, cache_status, rebase(entry.body, _client_base(request)))
    return whole(entry, label, cache_status)


STALE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Upstream answers that make a stale answer the better one (RFC 5861 stale-if-error): rate
limits, server errors, and the proxy's own 502/504 for an unreachable or silent upstream.
Never 400/401/403/404: those are about the request or the key."""


def failed(flight: Flight) -> bool:
    """Did the upstream fail for this flight in a way a stale answer may cover?"""
    head = flight.head
    return head is None or head.status in STALE_STATUSES


class Stale(NamedTuple):
    """An expired entry that may cover an upstream failure, and what it was looked up for."""

    key: str
    entry: CachedResponse
    plan: Plan


async def _serve_stale(
    st: State, ex: Exchange, rec: Record, flight: Flight, found: Stale
) -> web.StreamResponse | None:
    """The stale answer in place of the upstream's failure, saying which failure it covers,
    made this client's answer as a HIT is (_serve_entry); None when it cannot be given in the
    form asked for (the failure is relayed then)."""
    head = flight.head
    error, status = rec.error, rec.upstream_status
    if head is None or flight.reason in PROXY_FAILURES:
        rec.error = flight.reason if flight.reason in PROXY_FAILURES else "upstream_failed"
        cause = f"detail={rec.error.replace('_', '-')}"
    else:
        rec.upstream_status = head.status
        cause = f"fwd-status={head.status}"
    key, entry, plan = found
    served = await _serve_entry(st, ex.request, rec, key, entry, plan, stale(cause), STALE)
    if served is None:
        rec.error, rec.upstream_status = error, status
    return served


CONVERTED_MAX = 256
"""Converted twins kept (per process) so a repeat costs what a plain HIT costs."""
CONVERTED_KEEP_BYTES = 256 * 1024
"""Only converted answers up to this size are kept: the memo stays under 64 MB."""


async def _twin(
    st: State,
    rec: Record,
    key: str,
    entry: CachedResponse,
    plan: Plan,
    cache_status: str = HIT_CACHE_STATUS,
    label: CacheStatus = HIT,
) -> web.Response | None:
    """The stored answer in the form this request wants, when that is the other form (a
    streamed request for a stored JSON answer, or the reverse); None when the forms match or
    the stored answer cannot be converted: a damaged entry is deleted, and fetched again."""
    assert plan.twin is not None
    memo_key = (key, entry.created, plan.form)
    body = st.converted.get(memo_key)
    if body is None:
        try:  # a large answer is converted off the loop, like a large request body
            body = await _off_loop(st, len(entry.body), _convert_twin, plan, entry)
        except NotConvertible as exc:
            rec.extra["twin_error"] = bounded(str(exc), 120)
            await st.cache.delete(key, entry)
            return None
        if len(body) <= CONVERTED_KEEP_BYTES:
            if len(st.converted) >= CONVERTED_MAX:
                st.converted.pop(next(iter(st.converted)))
            st.converted[memo_key] = body
    rec.converted = f"{entry.form}->{plan.form}"
    rec.bytes = len(body)
    resp = web.Response(status=entry.status, body=body)
    headers = resp.headers
    for name, value in entry.headers:
        if name.lower() != "content-type":
            headers.add(name, value)
    sse = plan.form != "json"
    headers["Content-Type"] = "text/event-stream; charset=utf-8" if sse else "application/json"
    headers["X-Cache-Status"] = label.header
    headers["Cache-Status"] = cache_status
    headers["Age"] = age_of(entry)
    return resp


def _convert_twin(plan: Plan, entry: CachedResponse) -> bytes:
    """The stored answer in the plan's form (a stream to a stream goes through its object)."""
    assert plan.twin is not None
    source = entry.body
    if entry.stream and plan.form != "json":  # stream -> stream with(out) its usage chunk
        source = convert(plan.twin, source, to_stream=False, include_usage=False)
    return convert(
        plan.twin, source, to_stream=plan.form != "json", include_usage=plan.form == "sse+usage"
    )


def _saved(rec: Record, entry: CachedResponse) -> None:
    """A HIT or COALESCED answer: what its reuse saved (the original cost and time)."""
    rec.extra.update(entry.saved_fields)


def _idempotency_conflict() -> web.Response:
    return json_error(
        422,
        "This Idempotency-Key was already used with a different request body.",
        "invalid_request_error",
        "idempotency_key_reused",
    )


async def _relay(
    request: web.BaseRequest,
    rec: Record,
    flight: Flight,
    reader: Reader,
    label: CacheStatus,
    t0: float,
    write_timeout: float,
) -> web.StreamResponse:
    """Send a flight to one client: from its first chunk, then live; show a cut as a cut."""
    try:
        head = flight.head
        if head is None:
            rec.error = "upstream_failed"
            return json_error(
                502,
                f"The upstream answer failed: {bounded(flight.reason, 200)}",
                "proxy_error",
                "upstream_failed",
            )
        if flight.reason in PROXY_FAILURES:
            rec.error = flight.reason  # the 502/504 is the proxy's own answer
        headers: CIMultiDict[str] = CIMultiDict(head.headers)
        headers["X-Cache-Status"] = label.header
        headers["Cache-Status"] = label.rfc9211
        if flight.rebase:  # a small image answer: whole, with links under this client's base
            body = b"".join([chunk async for chunk in reader.chunks()])
            body = rebase(body, _client_base(request))
            return web.Response(status=head.status, headers=headers, body=body)
        whole = flight.done and flight.outcome is COMPLETE and not flight.overflow
        if whole and flight.size <= WHOLE_MAX:
            rec.chunks = len(flight.chunks)
            return web.Response(status=head.status, headers=headers, body=flight.body())
        resp = web.StreamResponse(status=head.status, headers=headers)
        if whole:
            resp.content_length = flight.size
        await resp.prepare(request)
        rec.ttfb_ms = round((time.perf_counter() - t0) * 1000.0, 2)
        nbytes = chunks = 0
        try:
            async for chunk in reader.chunks():
                await _write(request, resp, chunk, write_timeout)
                nbytes += len(chunk)
                chunks += 1
        except (ConnectionResetError, TimeoutError, Lagged) as exc:
            # gone, or taking nothing for write_timeout, or too slow for an overflowing flight
            if isinstance(exc, ConnectionResetError):
                rec.client_gone = True
            else:
                rec.client_dropped = True
            rec.bytes, rec.chunks = nbytes, chunks
            if not isinstance(exc, ConnectionResetError):
                _cut(request)
            return resp
        rec.bytes, rec.chunks = nbytes, chunks
        if flight.outcome is CUT:
            rec.cut = bounded(flight.reason, 200)
            _cut(request)
            return resp
        await resp.write_eof()
        return resp
    finally:
        reader.close()


ROOMY = 16 * 1024
"""A write that leaves the client's send buffer under this cannot wait for the client (the
transport pauses writers past its high-water mark, 64 KB): it goes without a timer."""


async def _write(
    request: web.BaseRequest, resp: web.StreamResponse, chunk: bytes, patience_s: float
) -> None:
    """Write one chunk to the client; TimeoutError if it takes nothing for `patience_s`. Most
    writes cannot wait, and skip the timer (one per chunk cost a stream about 1 KB)."""
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(chunk) <= ROOMY:
        await resp.write(chunk)
        return
    async with asyncio.timeout(patience_s):
        await resp.write(chunk)


def _client_base(request: web.BaseRequest) -> str:
    """The base URL this client reached the proxy at, for links to images the proxy serves."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    fallback = "http://127.0.0.1"
    if isinstance(sock, tuple) and len(sock) >= 2:
        host = f"[{sock[0]}]" if ":" in str(sock[0]) else str(sock[0])
        fallback = f"http://{host}:{sock[1]}"
    return client_base(request.scheme, request.headers.get("Host"), fallback)


def _drop(request: web.BaseRequest) -> None:
    """Drop a client that takes nothing: at once, freeing what its socket still buffers."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _cut(request: web.BaseRequest) -> None:
    """End the connection without the closing chunk, so the client sees the stream broke off."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def _passthrough(
    st: State, ex: Exchange, rec: Record, plan: Plan | None = None
) -> web.StreamResponse:
    """Forward as is and stream the answer back; nothing is read from or written to the cache.

    For a request that names a model, up to COUNT_BYTES of the answer are kept on the side to
    count the tokens and dollars it cost."""
    request, t0 = ex.request, ex.t0
    rec.cache = BYPASS
    resp: web.StreamResponse | None = None
    nbytes = chunks = 0
    kept: list[bytes] | None = [] if plan is not None and plan.model else None
    t_up = time.perf_counter()
    try:
        async with st.upstream.request(request.method, ex.path_qs, ex.fwd, ex.body) as up:
            headers: CIMultiDict[str] = CIMultiDict(response_headers(up.headers))
            headers["X-Cache-Status"] = BYPASS.header
            headers["Cache-Status"] = BYPASS.rfc9211
            resp = web.StreamResponse(status=up.status, headers=headers)
            if "Content-Encoding" not in up.headers and up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            rec.ttfb_ms = round((time.perf_counter() - t0) * 1000.0, 2)
            async for chunk in up.content.iter_any():
                try:
                    await _write(request, resp, chunk, st.settings.write_timeout_s)
                except (ConnectionResetError, TimeoutError) as exc:
                    gone = isinstance(exc, ConnectionResetError)
                    if gone:
                        rec.client_gone = True
                    else:
                        rec.client_dropped = True
                    break
                nbytes += len(chunk)
                chunks += 1
                if kept is not None:
                    kept.append(chunk)
                    if nbytes > COUNT_BYTES:
                        kept = None
            status = up.status
            streamed = "text/event-stream" in up.headers.get("Content-Type", "")
        rec.upstream_ms = round((time.perf_counter() - t_up) * 1000.0, 2)
        if kept is not None and plan is not None and 200 <= status < 300:
            data = b"".join(kept)
            usage = sse.usage_of_stream(data) if streamed else usage_of_json(data)
            cost = answer_cost(st.fetcher.prices, rec.route, plan.model, usage, plan.hints, data)
            if cost is not None:
                rec.extra.update(money_fields(cost.fields(), saved=False))
        rec.bytes, rec.chunks = nbytes, chunks
        if rec.client_dropped:
            _drop(request)
        elif not rec.client_gone:
            await resp.write_eof()
        return resp
    except UpstreamError as exc:
        failure = failure_answer(exc)
        rec.error = failure.code
        if resp is None:
            return web.Response(
                status=failure.status, body=failure.body, content_type="application/json"
            )
        rec.cut = "upstream timeout" if isinstance(exc, UpstreamTimeout) else bounded(str(exc), 200)
    rec.bytes, rec.chunks = nbytes, chunks
    _cut(request)
    return resp

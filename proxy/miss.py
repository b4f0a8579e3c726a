"""A Keyed request with no fresh entry to give: look it up (Fresh | Stale | Missing), try
the semantic layer, then join the key's flight or lead one (Join | Lead), across instances
through the bus, and relay the flight (relay.py); a stale entry covers an upstream failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import assert_never

from aiohttp import web

from proxy.bus import LOCAL, Conflict, Follow, Leader, Leadership, Local
from proxy.coalesce import COMPLETE, CUT, Flight, Reader
from proxy.errors import StoreUnavailable, json_error
from proxy.fetch import FetchJob
from proxy.hit import Stale, auth_refusal, failed, serve_entry, serve_stale
from proxy.images.base import PLACEHOLDER_BASE
from proxy.images.rehost import rewrites
from proxy.keys import key_id
from proxy.models import CLOCK, CachedResponse, money_fields
from proxy.passthrough import passthrough
from proxy.plan import Keyed, Mode, Plan
from proxy.record import Record
from proxy.relay import relay
from proxy.semantic import text_of
from proxy.state import Forward, State, off_loop
from proxy.status import (
    BYPASS,
    COALESCED,
    HIT_CACHE_STATUS,
    MISS,
    REFRESH,
    mark,
    semantic_hit,
)
from proxy.tasks import spawn
from proxy.vectors import Probe

LOOKUP, REFRESH_MODE = Mode.LOOKUP, Mode.REFRESH  # module names: see coalesce.PENDING


@dataclass(frozen=True, slots=True)
class Fresh:
    """A fresh stored answer for the key."""

    entry: CachedResponse


@dataclass(frozen=True, slots=True)
class Missing:
    """No answer to give: fetch one. `degraded`: the store is down (nothing is stored)."""

    degraded: bool = False


@dataclass(frozen=True, slots=True)
class Answered:
    """The request is answered already (an Idempotency-Key conflict, a semantic HIT...)."""

    answer: web.StreamResponse


@dataclass(frozen=True, slots=True)
class Join:
    """The key has a flight in this process: read it."""

    flight: Flight


@dataclass(frozen=True, slots=True)
class Lead:
    """No flight for the key: lead one (`probe`: the semantic lookup already made)."""

    fkey: str
    semantic: str
    probe: Probe | None


MISSING, DEGRADED = Missing(), Missing(degraded=True)


async def serve_keyed(
    st: State, fwd: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> web.StreamResponse:
    """A request with a key: answer from the cache, join a flight, or lead one."""
    rec.key = key_id(keyed.key)
    found = await lookup(st, keyed, plan)
    stale: Stale | None = None
    match found:
        case Answered():
            return found.answer
        case Fresh():
            refused = await auth_refusal(st, tenant, fwd.request, rec)
            if refused is not None:
                return refused
            served = await serve_entry(
                st, fwd.request, rec, keyed.key, found.entry, plan, HIT_CACHE_STATUS
            )
            if served is not None:
                return served
            found = MISSING  # not convertible: fetched again, in the form asked for
        case Stale():
            stale = found
        case Missing():
            pass
        case _:
            assert_never(found)
    degraded = found is DEGRADED
    chosen = await choose_flight(st, fwd, rec, plan, tenant, keyed, degraded)
    match chosen:
        case Answered():
            return chosen.answer
        case Join():
            return await join(st, fwd, rec, chosen.flight, plan, keyed, stale)
        case Lead():
            return await lead(st, fwd, rec, plan, tenant, keyed, chosen, stale, degraded)
        case _:
            assert_never(chosen)


async def lookup(st: State, keyed: Keyed, plan: Plan) -> Fresh | Stale | Missing | Answered:
    """The stored answer for the key, as the request's Cache-Control may take it."""
    key, fingerprint, controls = keyed.key, keyed.fingerprint, keyed.controls
    if controls.mode is not LOOKUP:
        return DEGRADED if controls.mode is REFRESH_MODE and not st.cache.healthy else MISSING
    entry = st.cache.peek(key)
    if entry is None and not st.cache.in_memory:  # (in memory, peek was the lookup)
        try:
            entry = await st.cache.get(key)
        except StoreUnavailable:
            return DEGRADED
    if entry is None:
        return MISSING
    if fingerprint and entry.meta.get("fingerprint") != fingerprint:
        return Answered(idempotency_conflict())
    now = CLOCK.now()
    if now <= entry.fresh_until:
        fits = controls.max_age is None or now - entry.created <= controls.max_age
        return Fresh(entry) if fits else MISSING
    rule = plan.rule
    window = controls.stale_window(rule.stale_if_error_s if rule is not None else 0.0)
    if window > 0 and now <= entry.fresh_until + window:
        return Stale(key, entry, plan)  # served only if the upstream fails for this request
    return MISSING


async def choose_flight(
    st: State,
    fwd: Forward,
    rec: Record,
    plan: Plan,
    tenant: bytes,
    keyed: Keyed,
    degraded: bool,
) -> Join | Lead | Answered:
    """Join the key's flight if there is one; else look the request up by meaning (a rule
    with `semantic` on), and lead one if that finds nothing either."""
    rule = plan.rule
    fingerprint, controls = keyed.fingerprint, keyed.controls
    coalesce = rule.coalesce if rule is not None else True
    # Twins share the store key, never a flight: a streamed and a non-streamed request in
    # flight at once each go upstream (a live stream is not converted half-way). But an
    # Idempotency-Key names one request in every form: one flight, which another form waits
    # for whole, then gets converted (join_form).
    fkey = f"{keyed.key}#{plan.form}" if plan.twin and not fingerprint else keyed.key
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
        probe = await probe_meaning(st, fwd, rec, plan, tenant, keyed)
        if probe.hit and probe.entry is not None:
            refused = await auth_refusal(st, tenant, fwd.request, rec)
            if refused is not None:
                return Answered(refused)
            similar = semantic_hit(probe.score or 0.0)
            served = await serve_entry(
                st, fwd.request, rec, probe.member, probe.entry, plan, similar
            )
            if served is not None:
                rec.extra["semantic_key"] = key_id(probe.member)
                return Answered(served)
        flight = st.flights.get(fkey) if coalesce else None  # one may have started meanwhile
    return Lead(fkey, semantic, probe) if flight is None else Join(flight)


async def join(
    st: State,
    fwd: Forward,
    rec: Record,
    flight: Flight,
    plan: Plan,
    keyed: Keyed,
    stale: Stale | None,
) -> web.StreamResponse:
    """Answer with a flight someone else leads here: its form, or another (join_form)."""
    if keyed.fingerprint and flight.fingerprint != keyed.fingerprint:
        return idempotency_conflict()
    lock_timeout = plan.rule.lock_timeout_s if plan.rule is not None else 30.0
    if flight.form != plan.form:
        return await join_form(st, fwd, rec, flight, plan, keyed.key, lock_timeout)
    return await follow(st, fwd, rec, flight, flight.attach(), lock_timeout, stale)


def _job(
    st: State, fwd: Forward, rec: Record, plan: Plan, keyed: Keyed, degraded: bool
) -> FetchJob:
    """The upstream read a led flight makes, and where its answer is stored."""
    rule = plan.rule
    return FetchJob(
        method=fwd.request.method,
        path_qs=fwd.path_qs,
        headers=fwd.fwd,
        body=fwd.body,
        route=rec.route,
        stream=plan.stream,
        store_key=keyed.key if keyed.store and not degraded else "",
        ttl_s=keyed.ttl_s,
        keep_s=keyed.keep_s,
        debounce_s=rule.debounce_s if rule is not None else 0.0,
        transform=st.transform
        if rule is not None and rule.rehost_images and rewrites(rec.route)
        else None,
        meta={
            "fingerprint": keyed.fingerprint,
            "model": plan.model,
            "route": rec.route,
            "hints": plan.hints,
        },
        public_base=st.settings.public_url or PLACEHOLDER_BASE,
    )


async def lead(
    st: State,
    fwd: Forward,
    rec: Record,
    plan: Plan,
    tenant: bytes,
    keyed: Keyed,
    chosen: Lead,
    stale: Stale | None,
    degraded: bool,
) -> web.StreamResponse:
    """Lead the key's flight (MISS, REFRESH, or BYPASS with the store down) and relay it."""
    rule = plan.rule
    coalesce = rule.coalesce if rule is not None else True
    label = BYPASS if degraded else (REFRESH if keyed.controls.mode is REFRESH_MODE else MISS)
    rec.cache = label
    flight = st.flights.lead(
        chosen.fkey,
        max_bytes=int(st.settings.max_record_mb * 1024 * 1024),
        fingerprint=keyed.fingerprint,
    )
    flight.form = plan.form
    if not coalesce:
        st.flights.forget(flight)
    job = _job(st, fwd, rec, plan, keyed, degraded)
    shadow: asyncio.Task[Probe] | None = None
    if chosen.semantic != "off" and keyed.store and not degraded:
        if chosen.probe is None:  # shadow: the lookup runs beside the upstream call
            probing = probe_meaning(st, fwd, rec, plan, tenant, keyed)
            shadow = spawn(probing, name="semantic-shadow")
        job.on_stored = partial(_remember, st, plan, chosen.probe, shadow, keyed.key)
    reader = flight.attach()
    started = await _start(
        st, fwd, rec, flight, reader, job, plan, keyed, stale, coalesce and not degraded
    )
    if started is not None:
        return started
    if stale is not None and failed(flight):
        served = await serve_stale(st, fwd.request, rec, flight, stale)
        if served is not None:
            reader.close()
            return served
    wt = st.settings.write_timeout_s
    resp = await relay(fwd.request, rec, flight, reader, label, fwd.t0, wt)
    rec.upstream_ms = round(flight.upstream_ms, 2) or None
    if st.auth is not None and flight.head is not None and flight.head.status < 300:
        st.auth.seen(tenant)
    if flight.entry is not None:
        rec.extra.update(money_fields(flight.entry.meta.get("cost"), saved=False))
    if shadow is not None and not shadow.done():
        rec.after = shadow  # the answer goes now; its line when the lookup is done
    return resp


async def _start(
    st: State,
    fwd: Forward,
    rec: Record,
    flight: Flight,
    reader: Reader,
    job: FetchJob,
    plan: Plan,
    keyed: Keyed,
    stale: Stale | None,
    shared: bool,
) -> web.StreamResponse | None:
    """Start the flight's upstream read (here, in a task, or following another instance
    that leads it) and wait for its head; an answer when another instance leads it."""
    fkey, fingerprint = flight.key, keyed.fingerprint
    lock_timeout = plan.rule.lock_timeout_s if plan.rule is not None else 30.0
    bus = st.bus if shared else None
    fed = inline = False
    try:  # whatever happens before a feeder starts, the flight must not stay registered
        lead: Leadership = LOCAL if bus is None else await bus.lead(fkey, fingerprint, plan.form)
        match lead:
            case Conflict():
                return idempotency_conflict()
            case Follow(form=form):
                assert bus is not None
                if fingerprint and form != plan.form:
                    # another form of this request is led elsewhere: whole, then converted
                    flight.form = form or "?"
                    job.stream = False  # (its form is read from its head)
                    reader.close()
                    st.fetcher.follow(bus, flight, job)
                    fed = True
                    return await join_form(st, fwd, rec, flight, plan, keyed.key, lock_timeout)
                st.fetcher.follow(bus, flight, job)  # another instance leads: follow it
                fed = True
                return await follow(st, fwd, rec, flight, reader, lock_timeout, stale)
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
    return None


async def follow(
    st: State,
    fwd: Forward,
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
        return await passthrough(st, fwd._replace(t0=time.perf_counter()), rec)
    if stale is not None and failed(flight):
        served = await serve_stale(st, fwd.request, rec, flight, stale)
        if served is not None:
            reader.close()
            return served
    rec.cache = COALESCED
    wt = st.settings.write_timeout_s
    resp = await relay(fwd.request, rec, flight, reader, COALESCED, fwd.t0, wt)
    if flight.entry is not None:
        rec.extra.update(flight.entry.saved_fields)
    return resp


async def join_form(
    st: State,
    fwd: Forward,
    rec: Record,
    flight: Flight,
    plan: Plan,
    key: str,
    lock_timeout: float,
) -> web.StreamResponse:
    """Answer with an Idempotency-Key flight led for another form of this request: once it
    is whole, its stored answer converted to this form (serve_entry); a failure as it came
    (errors are JSON in every form); a cut answer is fetched again, unstored."""
    head = await flight.wait_head(lock_timeout)
    if head is None and not flight.done:
        rec.lock_timeout = True
        return await passthrough(st, fwd._replace(t0=time.perf_counter()), rec)
    while not flight.done:
        await flight.changed()
    await asyncio.sleep(0)  # the leader stores a small answer as soon as its flight ends
    entry = flight.entry
    head = flight.head
    if entry is None and head is not None and head.status < 300:
        with contextlib.suppress(StoreUnavailable):  # (a large answer is stored by a task)
            entry = await st.cache.get(key)
    if entry is not None and entry.meta.get("fingerprint") == flight.fingerprint:
        served = await serve_entry(st, fwd.request, rec, key, entry, plan, HIT_CACHE_STATUS)
        if served is not None:
            rec.cache = COALESCED
            mark(served.headers, COALESCED)
            return served
    wt = st.settings.write_timeout_s
    if head is not None and head.status >= 300 and flight.outcome is COMPLETE:
        return await relay(fwd.request, rec, flight, flight.attach(), COALESCED, fwd.t0, wt)
    return await passthrough(st, fwd._replace(t0=time.perf_counter()), rec)


async def probe_meaning(
    st: State, fwd: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> Probe:
    """One semantic lookup; its fields go on the request's line."""
    assert st.semantic is not None and plan.rule is not None and plan.twin is not None
    request, controls = fwd.request, keyed.controls
    text = await off_loop(st, len(fwd.body), text_of, plan.twin, fwd.body)
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


def idempotency_conflict() -> web.Response:
    """422: this Idempotency-Key named another request."""
    return json_error(
        422,
        "This Idempotency-Key was already used with a different request body.",
        "invalid_request_error",
        "idempotency_key_reused",
    )

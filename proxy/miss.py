"""A Keyed request with no fresh entry to give: look it up (Fresh | Stale | Missing), try
the semantic layer, then join the key's flight or lead one (Join | Lead), across instances
through the bus, and relay the flight (relay.py); a stale entry covers an upstream failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import NamedTuple, assert_never

from aiohttp import web

from proxy.bus import Conflict, Follow, Leader, Local, RedisBus
from proxy.coalesce import COMPLETE, CUT, Flight, Reader
from proxy.controls import Mode
from proxy.cost import money_fields
from proxy.errors import StoreUnavailable, json_error
from proxy.fetch import FetchJob
from proxy.hit import Stale, auth_refusal, failed, serve_entry, serve_stale
from proxy.images.base import PLACEHOLDER_BASE
from proxy.images.rehost import rewrites
from proxy.keys import key_id
from proxy.models import CLOCK, CachedResponse
from proxy.passthrough import passthrough
from proxy.plan import Keyed, Plan
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
    Failure,
    mark,
    semantic_hit,
)
from proxy.tasks import spawn
from proxy.vectors import Probe

LOOKUP, REFRESH_MODE = Mode.LOOKUP, Mode.REFRESH  # module names: see coalesce.PENDING


class Fresh(NamedTuple):
    """A fresh stored answer for the key."""

    entry: CachedResponse


class Missing(NamedTuple):
    """No answer to give: fetch one. `degraded`: the store is down (nothing is stored)."""

    degraded: bool = False


class Answered(NamedTuple):
    """The request is answered already (an Idempotency-Key conflict, a semantic HIT...)."""

    answer: web.StreamResponse


class Join(NamedTuple):
    """The key has a flight in this process: read it."""

    flight: Flight


class Lead(NamedTuple):
    """No flight to join: lead `flight` (None until a lookup by meaning has found no answer:
    by_meaning takes it then); `probe`: the semantic lookup already made."""

    fkey: str
    semantic: str
    probe: Probe | None
    flight: Flight | None


MISSING, DEGRADED = Missing(), Missing(degraded=True)


async def serve_keyed(
    st: State, fwd: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> web.StreamResponse:
    """A request with a key: answer from the cache, join a flight, or lead one."""
    rec.key = keyed.kid
    found: Fresh | Stale | Missing | Answered = DEGRADED
    if keyed.controls.mode is not LOOKUP:
        if keyed.controls.mode is not REFRESH_MODE or st.cache.healthy:
            found = MISSING
    else:
        entry = st.cache.peek(keyed.key)
        try:
            if entry is None and not st.cache.in_memory:  # (in memory, peek was the lookup)
                entry = await st.cache.get(keyed.key)
            found = judge(entry, keyed, plan, CLOCK.now())
        except StoreUnavailable:
            pass
    stale: Stale | None = None
    match found:
        case Answered():
            return found.answer
        case Fresh():
            refused = await auth_refusal(st, tenant, fwd.request, rec)
            if refused is not None:
                return refused
            served = await serve_entry(
                st,
                fwd.request,
                rec,
                keyed.key,
                found.entry,
                plan,
                HIT_CACHE_STATUS,
                idempotent=bool(keyed.fingerprint),
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
    chosen: Join | Lead | Answered = choose_flight(st, plan, keyed, degraded)
    if type(chosen) is Lead and chosen.semantic == "on":
        chosen = await by_meaning(st, fwd, rec, plan, tenant, keyed, chosen)
    match chosen:
        case Answered():
            return chosen.answer
        case Join():
            return await join(st, fwd, rec, chosen.flight, plan, keyed, stale)
        case Lead():
            return await lead(st, fwd, rec, plan, tenant, keyed, chosen, stale, degraded)
        case _:
            assert_never(chosen)


def judge(
    entry: CachedResponse | None, keyed: Keyed, plan: Plan, now: float
) -> Fresh | Stale | Missing | Answered:
    """What the stored answer for the key is to this request (its Cache-Control, its
    Idempotency-Key), at `now`; no I/O."""
    if entry is None:
        return MISSING
    fingerprint, controls = keyed.fingerprint, keyed.controls
    if fingerprint and entry.meta.get("fingerprint") != fingerprint:
        return Answered(idempotency_conflict())
    if now <= entry.fresh_until:
        fits = controls.max_age is None or now - entry.created <= controls.max_age
        return Fresh(entry) if fits else MISSING
    rule = plan.rule
    window = controls.stale_window(rule.stale_if_error_s if rule is not None else 0.0)
    if window > 0 and now <= entry.fresh_until + window:
        return Stale(keyed.key, entry, plan)  # served only if the upstream fails for this one
    return MISSING


def choose_flight(st: State, plan: Plan, keyed: Keyed, degraded: bool) -> Join | Lead:
    """Join the key's flight if there is one, else lead one (registered at once, for the
    requests that come next to join); with a lookup by meaning to make first (Lead.semantic
    "on"), the flight is taken after it (by_meaning)."""
    rule = plan.rule
    fingerprint, controls = keyed.fingerprint, keyed.controls
    # Twins share the store key, never a flight: a streamed and a non-streamed request in
    # flight at once each go upstream (a live stream is not converted half-way). But an
    # Idempotency-Key names one request in every form: one flight, which another form waits
    # for whole, then gets converted (join_form).
    fkey = f"{keyed.key}#{plan.form}" if plan.twin and not fingerprint else keyed.key
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
    if semantic == "on":
        flight = st.flights.get(fkey) if rule is None or rule.coalesce else None
        return Lead(fkey, semantic, None, None) if flight is None else Join(flight)
    return take(st, plan, keyed, Lead(fkey, semantic, None, None))


def take(st: State, plan: Plan, keyed: Keyed, chosen: Lead) -> Join | Lead:
    """The key's flight in progress (Join), else `chosen` with a new flight to lead."""
    rule = plan.rule
    flight, new = st.flights.take(
        chosen.fkey,
        share=rule is None or rule.coalesce,
        max_bytes=int(st.settings.max_record_mb * 1024 * 1024),
        fingerprint=keyed.fingerprint,
    )
    return chosen._replace(flight=flight) if new else Join(flight)


async def by_meaning(
    st: State, fwd: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed, chosen: Lead
) -> Join | Lead | Answered:
    """Look the request up by meaning (a rule with `semantic` on): a semantic HIT, or the
    key's flight if one started meanwhile, or lead one (with the lookup's probe)."""
    probe = await probe_meaning(st, fwd, rec, plan, tenant, keyed)
    if probe.hit and probe.entry is not None:
        refused = await auth_refusal(st, tenant, fwd.request, rec)
        if refused is not None:
            return Answered(refused)
        similar = semantic_hit(probe.score or 0.0)
        served = await serve_entry(st, fwd.request, rec, probe.member, probe.entry, plan, similar)
        if served is not None:
            rec.extra["semantic_key"] = key_id(probe.member)
            return Answered(served)
    return take(st, plan, keyed, chosen._replace(probe=probe))


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
    rule, flight = plan.rule, chosen.flight
    assert flight is not None
    label = BYPASS if degraded else (REFRESH if keyed.controls.mode is REFRESH_MODE else MISS)
    rec.cache = label
    flight.form = plan.form
    job = _job(st, fwd, rec, plan, keyed, degraded)
    shadow = _shadow(st, fwd, rec, plan, tenant, keyed, chosen, job) if not degraded else None
    bus = st.bus if (rule is None or rule.coalesce) and not degraded else None
    reader: Reader | None = None
    if bus is None and not plan.stream and plan.twin is not None:
        # A chat or Responses answer asked for whole (a JSON object, bounded by the model's
        # output) is read by this handler, a task fewer per MISS; it needs no reader (nothing
        # is let go from a flight read whole).
        flight.task = asyncio.current_task()
        flight.whole = True
        st.fetcher.keep(flight, job, await st.fetcher.fetch(flight, job))
    else:
        reader = flight.attach()
        if bus is None:
            _start_local(st, flight, reader, job)
        else:
            shared = _start_shared(st, fwd, rec, flight, reader, job, plan, keyed, stale, bus)
            started = await shared
            if started is not None:
                return started
    try:  # the reader is let go whatever happens (a cancelled wait included)
        if flight.head is None and not flight.done:  # (a flight read inline has it)
            await flight.wait_head(None)
        if stale is not None and failed(flight):
            served = await serve_stale(st, fwd.request, rec, flight, stale)
            if served is not None:
                return served
        wt = st.settings.write_timeout_s
        resp = await relay(fwd.request, rec, flight, reader, label, fwd.t0, wt)
    finally:
        if reader is not None:
            reader.close()
    _led(st, rec, tenant, flight, shadow)
    return resp


def _led(
    st: State, rec: Record, tenant: bytes, flight: Flight, shadow: asyncio.Task[Probe] | None
) -> None:
    """What a led flight's answer adds to the line (upstream time, what it cost), and to the
    credential check (a tenant the upstream accepted)."""
    rec.upstream_ms = round(flight.upstream_ms, 2) or None
    if st.auth is not None and flight.head is not None and flight.head.status < 300:
        st.auth.seen(tenant)
    if flight.entry is not None:
        rec.extra.update(money_fields(flight.entry.meta.get("cost"), saved=False))
    if shadow is not None and not shadow.done():
        rec.after = shadow  # the answer goes now; its line when the lookup is done


def _shadow(
    st: State,
    fwd: Forward,
    rec: Record,
    plan: Plan,
    tenant: bytes,
    keyed: Keyed,
    chosen: Lead,
    job: FetchJob,
) -> asyncio.Task[Probe] | None:
    """With the semantic layer on for this request: index the answer once stored, under its
    probe; a shadow lookup (or one on with no probe yet) runs beside the upstream call."""
    if chosen.semantic == "off" or not keyed.store:
        return None
    shadow = None
    if chosen.probe is None:  # shadow: the lookup runs beside the upstream call
        shadow = spawn(probe_meaning(st, fwd, rec, plan, tenant, keyed), name="semantic-shadow")
    job.on_stored = partial(_remember, st, plan, chosen.probe, shadow, keyed.key)
    return shadow


def _abandon(st: State, flight: Flight, reader: Reader) -> None:
    """No upstream read was started for a flight: it must not stay registered."""
    reader.close()
    flight.finish(CUT, Failure.NOT_STARTED)
    st.flights.forget(flight)


def _start_local(st: State, flight: Flight, reader: Reader, job: FetchJob) -> None:
    """Start the upstream read of a flight this process leads, in its own task: a stream at
    the upstream's pace whatever this client's; other whole answers (speech, embeddings) can
    be large, and are relayed live."""
    try:
        st.fetcher.start(flight, job)
    except BaseException:
        _abandon(st, flight, reader)
        raise


async def _start_shared(
    st: State,
    fwd: Forward,
    rec: Record,
    flight: Flight,
    reader: Reader,
    job: FetchJob,
    plan: Plan,
    keyed: Keyed,
    stale: Stale | None,
    bus: RedisBus,
) -> web.StreamResponse | None:
    """Lead the flight across instances (bus.py), or follow the instance that leads it (then
    the answer); None once this instance's upstream read is started."""
    fkey, fingerprint = flight.key, keyed.fingerprint
    lock_timeout = plan.rule.lock_timeout_s if plan.rule is not None else 30.0
    fed = False
    try:  # whatever happens before a feeder starts, the flight must not stay registered
        lead = await bus.lead(fkey, fingerprint, plan.form)
        match lead:
            case Conflict():
                return idempotency_conflict()
            case Follow(form=form):
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
                st.fetcher.lead_shared(bus, flight, job, token)
            case Local():
                # the bus is down: this process leads (read by a task, whatever the form)
                st.fetcher.start(flight, job)
            case _:
                assert_never(lead)
        fed = True
    finally:
        if not fed:
            _abandon(st, flight, reader)
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
    """Answer with a flight someone else leads (here or on another instance); the reader
    is let go whatever happens."""
    try:
        head = await flight.wait_head(lock_timeout)
        if head is None and not flight.done:
            # The leader hangs: go upstream ourselves, uncached (nginx proxy_cache_lock_timeout).
            reader.close()
            rec.lock_timeout = True
            return await passthrough(st, fwd._replace(t0=time.perf_counter()), rec)
        if stale is not None and failed(flight):
            served = await serve_stale(st, fwd.request, rec, flight, stale)
            if served is not None:
                return served
        rec.cache = COALESCED
        wt = st.settings.write_timeout_s
        resp = await relay(fwd.request, rec, flight, reader, COALESCED, fwd.t0, wt)
    finally:
        reader.close()
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
        served = await serve_entry(
            st, fwd.request, rec, key, entry, plan, HIT_CACHE_STATUS, idempotent=True
        )
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
    text = await off_loop(st.workers, len(fwd.body), text_of, plan.twin, fwd.body)
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

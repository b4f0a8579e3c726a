"""Embeddings cached per input item: a list re-sent with a few items changed re-embeds only
those.

A `/v1/embeddings` request whose `input` is a list of 2 to MAX_ITEMS items (strings or token
arrays) is answered item by item. Each item is its own entry, keyed (HMAC, like every key)
over the tenant, namespace, route and every body field but `input` (so the model,
`dimensions` and `encoding_format` are in it) plus the item itself. The items found fresh
in the store are taken from it; those another request is fetching right now (ItemFlights,
in this process) are joined; the rest go upstream in one call, as one `input` list. The
answer holds every item in the original order, in the requested encoding (each entry keeps
the embedding exactly as the upstream wrote it in that encoding), and its `usage` counts
only what was sent upstream by this request.

X-Cache-Status is HIT when every item came from the store, MISS when every item went
upstream, COALESCED when none went upstream but some were joined, PARTIAL otherwise;
STALE when the upstream call failed (429, 5xx, unreachable) and every item it was for had
an entry past its freshness but within the stale-if-error window; BYPASS when the store
could not be read (the whole list went upstream). The
line carries `items`, `items_cached`, `items_joined`, `items_sent`; what the reused items
saved is an estimate (each entry keeps its share of the call's tokens, by length), logged
as `items_saved_tokens` / `items_saved_usd`.

Limits: joining is per process (across instances the items are fetched twice, never
served wrong); a joined item whose leader fails or takes longer than the rule's
lock_timeout_s is fetched by the joiner itself. An upstream error is relayed as it came,
and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.errors import StoreUnavailable, UpstreamError, error_body, failure_answer
from proxy.keys import cache_key, store_key
from proxy.models import CLOCK, CachedResponse
from proxy.normalize import canonical_json, has_float
from proxy.status import BYPASS, COALESCED, HIT, MISS, PARTIAL, STALE, CacheStatus, mark, stale
from proxy.tasks import spawn
from proxy.upstream import response_headers

if TYPE_CHECKING:
    from proxy.plan import Keyed, Plan
    from proxy.record import Record
    from proxy.state import Forward, State

MAX_ITEMS = 2048
"""OpenAI's limit on one request's inputs; a longer list is keyed whole, as before."""
ANSWER_MAX = 512 * 1024 * 1024
"""Largest upstream answer read whole (2048 items of 3072 floats as JSON: about 130 MB)."""
STALE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Failures a stale item may cover (as handlers.STALE_STATUSES: never a 4xx about the key)."""
OFF_LOOP_BYTES = 64 * 1024
"""Bodies and answers larger than this are keyed, parsed and assembled off the event loop."""


def is_item(value: Any) -> bool:
    """One embeddings input: a string, or a token array (a list of integers)."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def per_item(fields: dict[str, Any]) -> bool:
    """Is this embeddings body answered item by item (a list of 2..MAX_ITEMS items)?"""
    items = fields.get("input")
    return (
        isinstance(items, list)
        and 2 <= len(items) <= MAX_ITEMS
        and not all(isinstance(t, int) for t in items)  # one token array is one item
        and all(is_item(i) for i in items)
    )


@dataclass(frozen=True, slots=True)
class Items:
    """One request's items and their store keys (in the request's order)."""

    inputs: list[Any]
    keys: list[str]
    weights: list[int]
    """Each item's length (characters or tokens): its share of a call's usage."""
    fields: dict[str, Any]
    """The body without `input`."""


def item_keys(
    secret: bytes,
    tenant: bytes,
    method: str,
    route: str,
    query: str,
    namespace: str,
    label: str | None,
    ignore: tuple[str, ...],
    body: bytes,
) -> Items:
    """Parse the body and key each item (pure; run off the loop for long lists)."""
    fields = orjson.loads(body)
    inputs = fields.pop("input")
    model = fields.get("model")
    if isinstance(model, str):
        label = model  # the whole name in the store key: a purge by that name finds it
    fields.setdefault("encoding_format", "float")  # OpenAI's default: one entry for both
    base = canonical_json(fields, ignore, has_float(body))
    tid = tenant.hex()[:12]
    keys = []
    for item in inputs:
        canonical = base + b"\0item\0" + orjson.dumps(item)
        mac = cache_key(secret, tenant, method, route, query, namespace, canonical)
        keys.append(store_key(tid, namespace, label, route, mac))
    weights = [max(1, len(i)) for i in inputs]
    return Items(inputs, keys, weights, fields)


def split_answer(body: bytes, n: int) -> tuple[list[bytes], dict[str, Any], str] | None:
    """An upstream answer to an `n`-item call: each item's embedding as JSON bytes in the
    call's order, the usage and the model; None when it is not such an answer."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or len(data) != n:
        return None
    out: list[bytes | None] = [None] * n
    for d in data:
        i = d.get("index") if isinstance(d, dict) else None
        if not isinstance(i, int) or not 0 <= i < n or out[i] is not None or "embedding" not in d:
            return None
        out[i] = orjson.dumps(d["embedding"])
    usage = doc.get("usage")
    model = doc.get("model")
    return (
        [o for o in out if o is not None],
        usage if isinstance(usage, dict) else {},
        model if isinstance(model, str) else "",
    )


def assemble(embeddings: Sequence[bytes], model: str, usage: dict[str, Any]) -> bytes:
    """The answer OpenAI gives, from each item's embedding bytes (in order)."""
    parts = [
        b'{"object":"embedding","index":%d,"embedding":%b}' % (i, e)
        for i, e in enumerate(embeddings)
    ]
    return (
        b'{"object":"list","data":['
        + b",".join(parts)
        + b'],"model":'
        + orjson.dumps(model)
        + b',"usage":'
        + orjson.dumps(usage)
        + b"}"
    )


def status_of(cached: int, joined: int, sent: int) -> CacheStatus:
    """The request's X-Cache-Status from where its items came from."""
    if sent == 0:
        return HIT if joined == 0 else COALESCED
    if cached == 0 and joined == 0:
        return MISS
    return PARTIAL


def shares(tokens: int, weights: Sequence[int]) -> list[int]:
    """A call's tokens apportioned to its items by length (an estimate; sums to `tokens`)."""
    total = sum(weights) or 1
    out = [tokens * w // total for w in weights]
    if out:
        out[-1] += tokens - sum(out)
    return out


@dataclass(slots=True)
class ItemFlights:
    """Items being fetched in this process: store key -> the future of its embedding bytes
    (None when the fetch failed). Bounded by the requests in flight (MAX_ITEMS each)."""

    futures: dict[str, asyncio.Future[bytes | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.futures)


@dataclass(slots=True)
class _Got:
    """Where each item's embedding came from, filled in as the request goes."""

    embeddings: list[bytes | None]
    cached: int = 0
    joined: int = 0
    sent: int = 0
    saved_tokens: int = 0
    model: str = ""
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "total_tokens": 0})
    spent_usd: float | None = None
    upstream_ms: float = 0.0
    stale: dict[int, bytes] = field(default_factory=dict)
    """Items past their freshness but within the stale-if-error window, by position."""
    headers: tuple[tuple[str, str], ...] = ()
    """The last upstream call's answer headers (x-request-id, openai-*, x-ratelimit-*)."""


async def serve_items(
    st: State, ex: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> web.StreamResponse:
    """Answer a per-item embeddings request (see the module docstring)."""
    rule = plan.rule
    assert rule is not None
    items = await _keys(st, ex, rec, plan, tenant, keyed)
    got = _Got([None] * len(items.keys))
    stored = await _read_stored(st, items, keyed, got, rule.stale_if_error_s)
    if got.cached:
        refused = await _recheck(st, ex, rec, tenant)
        if refused is not None:
            return refused
    missing = [i for i, e in enumerate(got.embeddings) if e is None]
    failed = await _fetch(
        st, tenant, ex, items, missing, keyed, got, stored, rule.lock_timeout_s, rule.coalesce
    )
    if failed is not None:
        if not _stale_covers(failed, got):
            return failed
        rec.upstream_status = failed.status
        status = STALE
    elif not stored and keyed.store:  # the store is down: passed through, as BYPASS
        status = BYPASS if not got.joined else status_of(got.cached, got.joined, got.sent)
    else:
        status = status_of(got.cached, got.joined, got.sent)
    rec.cache = status
    rec.key = None
    body = await _assembled(st, got, got.model or plan.model or "")
    rec.bytes = len(body)
    _note(st, rec, plan, got)
    return _answer(body, got, status, rec)


async def _keys(
    st: State, ex: Forward, rec: Record, plan: Plan, tenant: bytes, keyed: Keyed
) -> Items:
    """The request's items and their store keys (keyed off the loop for a long body)."""
    assert plan.rule is not None
    args = (
        st.planner.secret,
        tenant,
        ex.request.method,
        rec.route,
        ex.request.query_string,
        keyed.controls.namespace,
        plan.model,
        plan.rule.ignore_fields,
        ex.body,
    )
    if len(ex.body) > OFF_LOOP_BYTES:
        return await asyncio.get_running_loop().run_in_executor(st.workers.cpu, item_keys, *args)
    return item_keys(*args)


async def _read_stored(
    st: State, items: Items, keyed: Keyed, got: _Got, stale_if_error_s: float
) -> bool:
    """Fill `got` from the store when the request looks up; whether to store what is fetched
    (False when the store is down)."""
    if keyed.controls.mode.value == "lookup":
        try:
            await _lookup(st, items, keyed, got, keyed.controls.stale_window(stale_if_error_s))
        except StoreUnavailable:
            return False
        return keyed.store
    return keyed.store if st.cache.healthy else False


async def _recheck(st: State, ex: Forward, rec: Record, tenant: bytes) -> web.Response | None:
    """A cached item proves nothing about this credential (auth.py): re-check it first; the
    refusal to give, if any."""
    auth = st.auth
    if auth is None or auth.fresh(tenant):
        return None
    refusal = await auth.check(tenant, ex.request.headers)
    if refusal is None:
        return None
    rec.auth_refused = True
    refused = web.Response(status=refusal.status, body=refusal.body)
    refused.headers.extend(refusal.headers)
    return refused


def _stale_covers(failed: web.Response, got: _Got) -> bool:
    """After a failure a stale entry may cover: when every missing item has a stale entry,
    fill them in (True); else the failure is the answer (False)."""
    if failed.status not in STALE_STATUSES or not got.stale:
        return False
    embeddings = got.embeddings
    if any(e is None and i not in got.stale for i, e in enumerate(embeddings)):
        return False
    for i, body in got.stale.items():
        if embeddings[i] is None:
            embeddings[i] = body
    return True


async def _assembled(st: State, got: _Got, model: str) -> bytes:
    """The answer's body from every item's embedding (assembled off the loop when large)."""
    parts = [e or b"null" for e in got.embeddings]
    if sum(len(e) for e in parts) > OFF_LOOP_BYTES:
        return await asyncio.get_running_loop().run_in_executor(
            st.workers.cpu, assemble, parts, model, got.usage
        )
    return assemble(parts, model, got.usage)


def _note(st: State, rec: Record, plan: Plan, got: _Got) -> None:
    """The log line's item counts, tokens and costs (spent, and saved by reused items)."""
    extra = rec.extra
    extra.update(
        items=len(got.embeddings),
        items_cached=got.cached,
        items_joined=got.joined,
        items_sent=got.sent,
    )
    if got.sent:
        rec.upstream_ms = round(got.upstream_ms, 2)
        extra["tokens_in"] = got.usage.get("prompt_tokens", 0)
        extra["tokens_out"] = 0
        extra["cost_usd"] = got.spent_usd
    if not got.saved_tokens:
        return
    saved = st.fetcher.prices.cost(
        rec.route, got.model or plan.model, {"prompt_tokens": got.saved_tokens}, {}
    )
    saved_usd = saved.usd if saved is not None else None
    if got.sent:
        extra["items_saved_tokens"] = got.saved_tokens
        extra["items_saved_usd"] = saved_usd
    else:
        extra.update(tokens_in=got.saved_tokens, tokens_out=0, saved_usd=saved_usd)
    if saved_usd is None:
        extra["unpriced"] = True


def _answer(body: bytes, got: _Got, status: CacheStatus, rec: Record) -> web.Response:
    """The 200 answer with the last call's headers and the cache status headers."""
    resp = web.Response(status=200, body=body, content_type="application/json")
    for name, value in got.headers:  # a call was made: its id and rate limits, as a MISS has
        if name.lower() != "content-type":
            resp.headers.add(name, value)
    cause = stale(f"fwd-status={rec.upstream_status}") if status is STALE else ""
    mark(resp.headers, status, cause)
    return resp


async def _lookup(st: State, items: Items, keyed: Keyed, got: _Got, window: float) -> None:
    """Fill `got` with every fresh stored item (one batch read); keep aside those past
    freshness but within `window` s of it (stale-if-error)."""
    cache = st.cache
    now = CLOCK.now()
    max_age = keyed.controls.max_age
    keys = items.keys
    found: list[CachedResponse | None]
    if cache.in_memory:
        found = [cache.peek(k) for k in keys]
    else:
        found = await cache.get_many(keys)
    for i, entry in enumerate(found):
        if entry is None:
            continue
        if entry.fresh_until < now:
            if window > 0 and now <= entry.fresh_until + window:
                got.stale[i] = entry.body
            continue
        if max_age is not None and now - entry.created > max_age:
            continue
        got.embeddings[i] = entry.body
        got.cached += 1
        got.saved_tokens += int(entry.meta.get("tokens") or 0)
        got.model = got.model or str(entry.meta.get("model") or "")


async def _fetch(
    st: State,
    tenant: bytes,
    ex: Forward,
    items: Items,
    missing: list[int],
    keyed: Keyed,
    got: _Got,
    store: bool,
    lock_timeout: float,
    coalesce: bool = True,
) -> web.Response | None:
    """Fetch the missing items: join those in flight (unless the rule says `coalesce =
    false`), send the rest upstream in one call.
    An upstream failure comes back as the answer to give (None: every item is in `got`)."""
    flights = st.items.futures
    loop = asyncio.get_running_loop()
    join = coalesce and keyed.controls.mode.value == "lookup"
    mine: dict[str, asyncio.Future[bytes | None]] = {}
    lead: list[int] = []  # first position of each key this request fetches
    joins: dict[str, asyncio.Future[bytes | None]] = {}
    at: dict[str, list[int]] = {}
    for i in missing:
        key = items.keys[i]
        at.setdefault(key, []).append(i)
        if len(at[key]) > 1:
            continue  # the same item twice in one list: fetched once
        future = flights.get(key) if join else None
        if future is not None and not future.done():
            joins[key] = future
        else:
            mine[key] = flights[key] = loop.create_future()
            lead.append(i)
    try:
        if lead:
            failed = await _call(st, tenant, ex, items, lead, keyed, got, store, at)
            if failed is not None:
                return failed
        if joins:
            retry = await _join(joins, lock_timeout, got, at)
            if retry:
                again = [at[k][0] for k in retry]
                failed = await _call(st, tenant, ex, items, again, keyed, got, store, at)
                if failed is not None:
                    return failed
        return None
    finally:
        for key, future in mine.items():
            if not future.done():
                future.set_result(None)
            if flights.get(key) is future:
                del flights[key]


async def _join(
    joins: dict[str, asyncio.Future[bytes | None]],
    lock_timeout: float,
    got: _Got,
    at: dict[str, list[int]],
) -> list[str]:
    """Wait for items another request fetches; the keys this request must fetch itself."""
    waiting = {asyncio.shield(f): k for k, f in joins.items()}
    done, pending = await asyncio.wait(waiting, timeout=lock_timeout)
    retry = []
    for f in pending:
        f.cancel()
        retry.append(waiting[f])
    for f in done:
        key = waiting[f]
        value = f.result()
        if value is None:
            retry.append(key)
            continue
        for i in at[key]:
            got.embeddings[i] = value
        got.joined += len(at[key])
    return retry


async def _call(
    st: State,
    tenant: bytes,
    ex: Forward,
    items: Items,
    lead: list[int],
    keyed: Keyed,
    got: _Got,
    store: bool,
    at: dict[str, list[int]],
) -> web.Response | None:
    """One upstream call for the items at `lead`; their entries stored and futures set."""
    body = orjson.dumps({**items.fields, "input": [items.inputs[i] for i in lead]})
    t0 = time.perf_counter()
    began = CLOCK.now()  # the fill begins: a purge after this keeps its items out
    try:
        async with st.upstream.request("POST", ex.path_qs, ex.fwd, body) as up:
            status = up.status
            headers = response_headers(up.headers)
            data = await _read(up)
    except UpstreamError as exc:
        failure = failure_answer(exc)
        return web.Response(
            status=failure.status, body=failure.body, content_type="application/json"
        )
    got.upstream_ms += (time.perf_counter() - t0) * 1000.0
    if status == 200 and st.auth is not None:
        st.auth.seen(tenant)
    split = await _split(st, status, data, len(lead))
    if split is None:  # the upstream's error: relayed as it came
        return _relayed(status, data, headers)
    if isinstance(split, web.Response):
        return split
    embeddings, usage, model = split
    got.headers = headers
    got.model = got.model or model
    _spent(st, got, usage, model)
    tokens = usage.get("prompt_tokens")
    share = shares(tokens if isinstance(tokens, int) else 0, [items.weights[i] for i in lead])
    now = CLOCK.now()
    flights = st.items.futures
    for j, i in enumerate(lead):
        key = items.keys[i]
        emb = embeddings[j]
        for pos in at[key]:
            got.embeddings[pos] = emb
        got.sent += len(at[key])
        future = flights.get(key)
        if future is not None and not future.done():
            future.set_result(emb)
        if store:
            entry = _entry(emb, now, began, keyed.ttl_s, share[j], model)
            _put(st, key, entry, keyed.ttl_s + keyed.keep_s)
    return None


def _entry(
    emb: bytes, now: float, began: float, ttl_s: float, tokens: int, model: str
) -> CachedResponse:
    """One item's entry: its embedding bytes, its share of the call's tokens, the model."""
    return CachedResponse(
        200,
        (),
        emb,
        now,
        upstream_ms=(now - began) * 1000.0,  # when the fill began (Cache.purged)
        meta={"ttl": ttl_s, "tokens": tokens, "model": model},
    )


async def _split(
    st: State, status: int, data: bytes | None, n: int
) -> tuple[list[bytes], dict[str, Any], str] | web.Response | None:
    """A 200 answer split per item (parsed off the loop when long); a 502 answer when it
    does not answer these `n` items one by one; None for an answer to relay as it came."""
    if status != 200 or data is None:
        return None
    if len(data) > OFF_LOOP_BYTES:  # a long list's answer: parsed off the loop
        split = await asyncio.get_running_loop().run_in_executor(
            st.workers.cpu, split_answer, data, n
        )
    else:
        split = split_answer(data, n)
    if split is None:  # a 200 that does not answer these items one by one
        return web.Response(
            status=502,
            body=error_body(
                "The upstream's embeddings answer does not match the items sent.",
                "proxy_error",
                "upstream_bad_answer",
            ),
            content_type="application/json",
        )
    return split


def _relayed(status: int, data: bytes | None, headers: Sequence[tuple[str, str]]) -> web.Response:
    """The upstream's error answer, as it came, marked a MISS."""
    resp = web.Response(status=status, body=data or b"")
    for name, value in headers:
        resp.headers.add(name, value)
    mark(resp.headers, MISS)
    return resp


def _spent(st: State, got: _Got, usage: dict[str, Any], model: str) -> None:
    """Adds one call's usage and its cost to `got`."""
    for name in ("prompt_tokens", "total_tokens"):
        count = usage.get(name)
        if isinstance(count, int):
            got.usage[name] = got.usage.get(name, 0) + count
    cost = st.fetcher.prices.cost("/v1/embeddings", model or None, usage, {})
    if cost is not None and cost.usd is not None:
        got.spent_usd = round((got.spent_usd or 0.0) + cost.usd, 8)


def _put(st: State, key: str, entry: CachedResponse, ttl_s: float) -> None:
    cache = st.cache
    if cache.put(key, entry, ttl_s):
        return

    async def write() -> None:
        with contextlib.suppress(StoreUnavailable):
            await cache.set(key, entry, ttl_s)

    spawn(write(), name="store:embedding-item")


async def _read(up: Any) -> bytes | None:
    """The whole upstream answer, or None past ANSWER_MAX."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in up.content.iter_any():
        size += len(chunk)
        if size > ANSWER_MAX:
            return None
        chunks.append(chunk)
    return b"".join(chunks)

"""The semantic layer's I/O half: embeddings, the shared vector index, and the lookup.

- **Embeddings** come from the upstream's embeddings route with the caller's own credential
  (cost and tenancy stay the caller's). They go through the exact cache like any embeddings
  request, are bounded by `--semantic-timeout-s`, and identical ones in flight share one call.
  Any failure is a plain MISS: `semantic.embeddings_unavailable` is logged once per burst, and
  after a failure that is not the caller's (timeout, 5xx, unreachable) no embedding is asked
  for `BREAKER_S`, so a dead embeddings service costs each request nothing.
- **The index** lives in the store beside the entries (SQLite table, Redis stream per
  partition, memory), so every instance and worker sees the same candidates. A record holds
  the entry's key, its freshness, the guards' digests and the vector (float16); never the
  text. Each process keeps the partitions it searches in memory (numpy, bounded by
  `--semantic-memory-mb`) and reads only the records added since its last look.
- **The lookup** (`Semantic.probe`): embed, sync, one matrix product, then the best
  candidates in order: the guards (guards.py), then the entry itself, which must exist and
  be fresh. A candidate whose entry is gone is forgotten.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import structlog
from multidict import CIMultiDict

from proxy import guards
from proxy.cache import Cache
from proxy.cost import Prices
from proxy.errors import EmbeddingFailed, StoreUnavailable, UpstreamError
from proxy.keys import CREDENTIAL_HEADERS, Headers, Scope
from proxy.models import CLOCK, CachedResponse
from proxy.plan import Plan, make_plan
from proxy.rules import Rule, Rules
from proxy.semantic import answer_text, judge_body, judge_says
from proxy.upstream import Upstream, response_headers

log = structlog.get_logger()

BREAKER_S = 10.0
"""After an embeddings failure that is not the caller's, no embedding is asked for this long."""
LOG_EVERY_S = 60.0
"""`semantic.embeddings_unavailable` is logged once per burst of failures, at most this often."""
TOP_K = 8
"""Candidates checked (guards, then the entry) per lookup, best first."""
PAGE = 500
"""Records read from the store per call when a partition is synced."""
ADD_ON_LOOP = 32
"""More records than this in one sync are unpacked off the event loop."""
FEATURES_ON_LOOP = 1000
"""Longer texts have their guard features read on the request-cpu pool (8000 characters
take several milliseconds)."""
OFF_LOOP = 262_144
"""Matrix products larger than this (rows x dimensions) run on the request-cpu pool."""
ANSWER_MAX = 4 * 1024 * 1024
"""Largest embeddings answer read (3072 floats in JSON are about 70 KB)."""
DIMS_MAX = 8192
"""Largest vector taken (the models have 256 to 3072 dimensions; a record holds up to 65535)."""
FORWARDED = (*CREDENTIAL_HEADERS, "OpenAI-Organization", "OpenAI-Project")
_HEAD = struct.Struct("<BdHHH")  # version, expires, key length, guards length, dimensions
RECORD_VERSION = 2
"""Records of another version (an older proxy's) are skipped, as damaged ones are."""


def pack(member: str, sig: bytes, expires: float, vector: np.ndarray) -> bytes:
    """One index record: the entry's key, its freshness, the guards' digests, the vector."""
    key = member.encode()
    v16 = np.asarray(vector, dtype="<f2")
    head = _HEAD.pack(RECORD_VERSION, expires, len(key), len(sig), v16.shape[0])
    return head + key + sig + v16.tobytes()


def unpack(record: bytes) -> tuple[str, bytes, float, np.ndarray]:
    """(member, guard digests, expires, vector as float32); ValueError when damaged."""
    version, expires, klen, slen, dims = _HEAD.unpack_from(record)
    if version != RECORD_VERSION:
        raise ValueError("vector record of another version")
    start = _HEAD.size + klen + slen
    if len(record) != start + 2 * dims:
        raise ValueError("damaged vector record")
    member = record[_HEAD.size : _HEAD.size + klen].decode()
    sig = record[_HEAD.size + klen : start]
    vector = np.frombuffer(record, dtype="<f2", count=dims, offset=start).astype(np.float32)
    return member, sig, expires, vector


ROW_OVERHEAD = 160
"""Bytes a row holds besides its vector, its key and its guard digests (list slots, object
headers, its expiry)."""
PART_FLOOR = 4096
"""Bytes counted for a partition however empty (its arrays, lock and dictionary slot), so a
client inventing namespaces holds a bounded number of them."""


class Partition:
    """One partition's vectors in this process: rows in store order, newest last."""

    __slots__ = (
        "after",
        "counted",
        "dims",
        "expires",
        "extra",
        "keep",
        "lock",
        "matrix",
        "max_bytes",
        "members",
        "n",
        "sigs",
    )

    def __init__(self, keep: int, max_bytes: int = 1 << 62) -> None:
        self.after = 0
        """The store's sequence number of the last record read."""
        self.dims = 0
        self.matrix = np.zeros((0, 0), dtype=np.float32)
        self.n = 0
        self.members: list[str] = []
        self.sigs: list[bytes] = []
        self.expires = np.zeros(0, dtype=np.float64)
        self.keep = keep
        self.max_bytes = max_bytes
        """What one partition may hold: fewer rows than `keep` are kept when they would not
        fit (a single partition is capped too)."""
        self.extra = 0
        """Bytes held by the rows' keys and guard digests (and ROW_OVERHEAD each)."""
        self.counted = 0
        """What VectorIndex.bytes counts for this partition (0 once evicted)."""
        self.lock = asyncio.Lock()
        """One sync at a time (a large batch of records is added off the event loop)."""

    @property
    def nbytes(self) -> int:
        """Memory held, with a floor per partition (so empty ones are bounded in number too)."""
        return int(self.matrix.nbytes + self.expires.nbytes) + self.extra + PART_FLOOR

    def limit(self) -> int:
        """Rows kept: `keep`, or fewer when that many would not fit in `max_bytes`."""
        if self.dims == 0:
            return self.keep
        per_row = 4 * self.dims + 8 + (self.extra // self.n if self.n else 0) + ROW_OVERHEAD
        return max(1, min(self.keep, (self.max_bytes - PART_FLOOR) // per_row))

    def add(self, rows: list[tuple[int, bytes]]) -> None:
        """Append records read from the store (those already held are skipped)."""
        for seq, record in rows:
            if seq <= self.after:
                continue
            self.after = seq
            try:
                member, sig, expires, vector = unpack(record)
            except (ValueError, struct.error, UnicodeDecodeError):
                continue
            if self.dims == 0:
                self.dims = vector.shape[0]
                self.matrix = np.zeros((8, self.dims), dtype=np.float32)
                self.expires = np.zeros(8, dtype=np.float64)
            if vector.shape[0] != self.dims:
                continue
            if self.n == self.matrix.shape[0]:
                limit = self.limit()
                if self.n >= limit:
                    self._keep_newest(max(0, limit - max(1, limit // 8)))
                if self.n == self.matrix.shape[0]:
                    self._grow(limit)
            norm = float(np.linalg.norm(vector))
            self.matrix[self.n] = vector / norm if norm > 0 else vector
            self.expires[self.n] = expires
            self.members.append(member)
            self.sigs.append(sig)
            self.extra += len(member) + len(sig) + ROW_OVERHEAD
            self.n += 1
        limit = self.limit()
        if self.n > limit:
            self._keep_newest(limit)

    def _grow(self, limit: int) -> None:
        cap = max(8, min(self.matrix.shape[0] * 2, limit + 1))
        matrix = np.zeros((cap, self.dims), dtype=np.float32)
        matrix[: self.n] = self.matrix[: self.n]
        expires = np.zeros(cap, dtype=np.float64)
        expires[: self.n] = self.expires[: self.n]
        self.matrix, self.expires = matrix, expires

    def _keep_newest(self, keep: int) -> None:
        drop = self.n - keep
        self.matrix = self.matrix[drop : self.n].copy()
        self.expires = self.expires[drop : self.n].copy()
        self.members = self.members[drop:]
        self.sigs = self.sigs[drop:]
        self.extra = sum(len(m) + len(s) for m, s in zip(self.members, self.sigs, strict=True))
        self.extra += ROW_OVERHEAD * keep
        self.n = keep

    def view(self) -> View:
        """The rows as they are now: later syncs append after them or build new arrays, so a
        view stays true while its product runs off the loop."""
        n = self.n
        return View(self, self.matrix[:n], self.expires[:n], self.members, self.sigs)


@dataclass(frozen=True, slots=True)
class View:
    part: Partition
    matrix: np.ndarray
    expires: np.ndarray
    members: list[str]
    sigs: list[bytes]

    def scores(self, query: np.ndarray, now: float) -> np.ndarray:
        """Cosine similarity of every row with `query` (a unit vector); -2 for expired rows."""
        scores: np.ndarray = self.matrix @ query
        scores[self.expires < now] = -2.0
        return scores

    def forget(self, row: int) -> None:
        """A candidate whose entry is gone is never offered again."""
        if self.part.members is self.members:  # not compacted since
            self.part.expires[row] = 0.0


def top(scores: np.ndarray, k: int) -> list[int]:
    """The rows of the k best scores, best first."""
    if scores.shape[0] <= k:
        return [int(i) for i in np.argsort(-scores)]
    best = np.argpartition(-scores, k)[:k]
    return [int(i) for i in best[np.argsort(-scores[best])]]


class VectorIndex:
    """The partitions this process searched lately, synced from the store on every lookup.

    Memory is capped over all partitions (`max_bytes`): the least recently searched are
    dropped, a single partition keeps only the newest rows that fit, and first loads (a
    partition's whole history) run one at a time, so ten at once hold no more than one."""

    def __init__(
        self, cache: Cache, *, keep: int, max_bytes: int, cpu: ThreadPoolExecutor | None = None
    ) -> None:
        self.cache = cache
        self.cpu = cpu
        self.keep = keep
        self.max_bytes = max_bytes
        self.parts: OrderedDict[str, Partition] = OrderedDict()
        self.bytes = 0
        """What the partitions held hold (the sum of their `counted`), kept as they change."""
        self.loading = asyncio.Semaphore(1)
        """First loads, one at a time."""

    def _count(self, part: str, p: Partition) -> None:
        """Bring `bytes` up to date with `p` (if it is still held), then drop the least
        recently searched partitions (never `p`) until the total fits."""
        if self.parts.get(part) is p:
            now = p.nbytes
            self.bytes += now - p.counted
            p.counted = now
        while self.bytes > self.max_bytes and len(self.parts) > 1:
            name, gone = next(iter(self.parts.items()))
            if gone is p:
                self.parts.move_to_end(name)
                name, gone = next(iter(self.parts.items()))
            del self.parts[name]
            self.bytes -= gone.counted
            gone.counted = 0

    async def sync(self, part: str) -> View:
        """The partition with every record the store holds for it, as a view taken while no
        add runs (its rows stay aligned with their keys); StoreUnavailable."""
        p = self.parts.get(part)
        first = p is None
        if p is None:
            p = self.parts[part] = Partition(self.keep, self.max_bytes)
        self.parts.move_to_end(part)
        self._count(part, p)
        if first:
            async with self.loading:
                return await self._sync(part, p)
        return await self._sync(part, p)

    async def _sync(self, part: str, p: Partition) -> View:
        store = self.cache.store
        async with p.lock:
            while True:
                rows = await store.vectors_since(part, p.after, PAGE)
                if rows:
                    if len(rows) > ADD_ON_LOOP:  # a first sync: thousands of records
                        await asyncio.get_running_loop().run_in_executor(self.cpu, p.add, rows)
                    else:
                        p.add(rows)
                    self._count(part, p)
                if len(rows) < PAGE:
                    break
            return p.view()

    async def add(self, part: str, member: str, record: bytes, expires: float) -> None:
        await self.cache.store.vectors_add(part, member, record, expires, self.keep)


@dataclass(slots=True)
class Embedding:
    vector: np.ndarray
    """A unit vector."""
    cost_usd: float | None
    """What the call cost the caller; None when it came from the cache."""


def _inflight_key(tenant: bytes, namespace: str, path: str, server: str, body: bytes) -> str:
    """The key under which concurrent identical embeddings requests share one call: one
    tenant, namespace, route and embeddings server only."""
    return hashlib.blake2b(
        tenant + b"\0" + namespace.encode() + b"\0" + path.encode() + b"\0" + server.encode() + body
    ).hexdigest()


def _as_failure(exc: BaseException, timeout_s: float) -> EmbeddingFailed:
    """Any exception out of an embeddings call, as the EmbeddingFailed to raise."""
    if isinstance(exc, EmbeddingFailed):
        return exc
    if isinstance(exc, TimeoutError):
        return EmbeddingFailed(f"no embedding within {timeout_s:g} s")
    return EmbeddingFailed(type(exc).__name__)


class Embedder:
    """Embeddings through the exact cache, time-limited, fail-open."""

    def __init__(
        self,
        upstream: Upstream,
        cache: Cache,
        rules: Rules,
        secret: bytes,
        prices: Prices,
        *,
        timeout_s: float,
        servers: dict[str, Upstream] | None = None,
        default_server: str = "",
        local_key: str = "",
    ) -> None:
        self.upstream = upstream
        self.servers = servers or {}
        """Embeddings servers by base URL (--semantic-embeddings-url, a rule's
        `semantic_embeddings_url`): asked with their own key, never the caller's; their
        vectors are not kept in the exact cache, where they could answer the caller's own
        embeddings requests of the same body."""
        self.default_server = default_server
        self.local_key = local_key
        self.cache = cache
        self.rules = rules
        self.secret = secret
        self.prices = prices
        self.timeout_s = timeout_s
        self.down_until = 0.0
        self.failing = False
        self._logged = -1e9
        self._inflight: dict[str, asyncio.Future[Embedding]] = {}

    async def embed(
        self,
        model: str,
        text: str,
        *,
        tenant: bytes,
        namespace: str,
        headers: Headers,
        route: str,
        query: str,
        server: str = "",
    ) -> Embedding:
        """The unit vector of `text` (from `server`, a base URL, else the default one, else
        the upstream); raises EmbeddingFailed (never anything else)."""
        local = self.servers.get(server or self.default_server)
        if time.monotonic() < self.down_until:
            raise EmbeddingFailed("embeddings unavailable (waiting after a failure)")
        path = _embeddings_route(route, model)
        body = orjson.dumps({"model": model, "input": text, "encoding_format": "base64"})
        qs = query if path.startswith("/openai/deployments/") else ""
        scope = Scope(self.secret, tenant, "POST", path, qs)
        plan = make_plan(self.rules, scope, namespace, "application/json", body)
        # in-flight sharing within one tenant (and namespace, route) only
        where = server or self.default_server if local is not None else ""
        memo = _inflight_key(tenant, namespace, path, where, body)
        shared = self._inflight.get(memo)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[Embedding] = asyncio.get_running_loop().create_future()
        self._inflight[memo] = future
        try:
            async with asyncio.timeout(self.timeout_s):
                if local is not None:
                    result = await self._embed_local(local, body)
                else:
                    result = await self._embed(plan, path, qs, body, headers)
        except BaseException as exc:
            failure = _as_failure(exc, self.timeout_s)
            future.set_exception(failure)
            future.exception()  # retrieved: a future nobody shared must not warn
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._failed(failure)
            raise failure from None
        finally:
            self._inflight.pop(memo, None)
        future.set_result(result)
        if self.failing:
            self.failing = False
            log.info("semantic.embeddings_recovered")
        return result

    def _failed(self, exc: EmbeddingFailed) -> None:
        if not exc.caller:
            self.down_until = time.monotonic() + BREAKER_S
        now = time.monotonic()
        if not self.failing or now - self._logged > LOG_EVERY_S:
            log.warning("semantic.embeddings_unavailable", reason=str(exc)[:200])
            self._logged = now
        self.failing = True

    async def _embed(
        self,
        plan: Plan,
        path: str,
        qs: str,
        body: bytes,
        headers: Headers,
    ) -> Embedding:
        rule = plan.rule
        if rule is not None and plan.key:
            entry = self.cache.peek(plan.key)
            if entry is None:
                try:
                    entry = await self.cache.get(plan.key)
                except StoreUnavailable:
                    entry = None
            if entry is not None and entry.fresh_until >= CLOCK.now():
                return Embedding(_vector_of(entry.body), None)
        fwd: CIMultiDict[str] = CIMultiDict()
        for name in FORWARDED:
            for value in headers.getall(name, ()):
                fwd.add(name, value)
        fwd["Content-Type"] = "application/json"
        path_qs = path + ("?" + qs if qs else "")
        started = time.monotonic()
        try:
            async with self.upstream.request("POST", path_qs, fwd, body) as resp:
                status, head = resp.status, response_headers(resp.headers)
                pieces: list[bytes] = []
                size = 0
                async for piece in resp.content.iter_any():
                    size += len(piece)
                    if size > ANSWER_MAX:
                        raise EmbeddingFailed("embeddings answer too large")
                    pieces.append(piece)
                data = b"".join(pieces)
        except UpstreamError as exc:
            raise EmbeddingFailed(f"embeddings: {type(exc).__name__}") from None
        if status != 200:
            raise EmbeddingFailed(f"embeddings answered {status}", caller=400 <= status < 500)
        vector = _vector_of(data)
        usage = _usage(data)
        cost = self.prices.cost(path, plan.model, usage, {})
        if rule is not None and rule.store and plan.key:
            await self._store(plan, rule, head, data, started)
        return Embedding(vector, cost.usd if cost is not None else None)

    async def _embed_local(self, local: Upstream, body: bytes) -> Embedding:
        fwd: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        if self.local_key:
            fwd["Authorization"] = f"Bearer {self.local_key}"
        path = "/v1/embeddings"  # joined with the server's base path once (join_path)
        data = await self._read(local, path, fwd, body)
        return Embedding(_vector_of(data), None)

    async def _read(
        self, upstream: Upstream, path_qs: str, headers: CIMultiDict[str], body: bytes
    ) -> bytes:
        """A whole 200 answer from an embeddings route, bounded; EmbeddingFailed."""
        try:
            async with upstream.request("POST", path_qs, headers, body) as resp:
                status = resp.status
                pieces: list[bytes] = []
                size = 0
                async for piece in resp.content.iter_any():
                    size += len(piece)
                    if size > ANSWER_MAX:
                        raise EmbeddingFailed("embeddings answer too large")
                    pieces.append(piece)
        except UpstreamError as exc:
            raise EmbeddingFailed(f"embeddings: {type(exc).__name__}") from None
        if status != 200:
            raise EmbeddingFailed(f"embeddings answered {status}")
        return b"".join(pieces)

    async def _store(
        self,
        plan: Plan,
        rule: Rule,
        head: tuple[tuple[str, str], ...],
        data: bytes,
        started: float,
    ) -> None:
        entry = CachedResponse(
            status=200,
            headers=tuple((k, v) for k, v in head if not k.lower().startswith("x-ratelimit-")),
            body=data,
            created=CLOCK.now(),
            stream=False,
            upstream_ms=round((time.monotonic() - started) * 1000.0, 1),
            meta={"model": plan.model, "route": "/v1/embeddings", "ttl": rule.ttl_s},
        )
        with contextlib.suppress(StoreUnavailable):  # a failed write is only a later miss
            await self.cache.set(plan.key, entry, rule.ttl_s + rule.stale_if_error_s)


def _embeddings_route(route: str, model: str) -> str:
    """Where the embedding of a request on `route` is asked for (Azure: the deployment)."""
    if route.startswith("/openai/deployments/"):
        return f"/openai/deployments/{model}/embeddings"
    return "/v1/embeddings"


def _usage(data: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _vector_of(data: bytes) -> np.ndarray:
    """The unit vector in an embeddings answer (base64 or floats); EmbeddingFailed if none."""
    try:
        doc = orjson.loads(data)
        raw = doc["data"][0]["embedding"]
        if isinstance(raw, str):
            vector = np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
        else:
            vector = np.asarray(raw, dtype=np.float32)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise EmbeddingFailed(f"embeddings answer unreadable: {type(exc).__name__}") from None
    if vector.ndim != 1 or vector.size > DIMS_MAX:
        raise EmbeddingFailed("embeddings answer holds no usable vector")
    norm = float(np.linalg.norm(vector)) if vector.size else 0.0
    if not np.isfinite(norm) or norm == 0.0:
        raise EmbeddingFailed("embeddings answer holds no usable vector")
    return vector / norm


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the judge said of one (request, candidate) pair."""

    ok: bool
    ms: float = 0.0
    usd: float | None = None
    cached: bool = False
    error: str | None = None


class Verifier:
    """`semantic_verify = "llm"`: a small judge model, through the upstream with the caller's
    credential, confirms a candidate before it is served. Verdicts are kept per (tenant's
    text, candidate) pair in this process (bounded); a failed or unreadable verdict is a no."""

    def __init__(
        self, upstream: Upstream, prices: Prices, *, timeout_s: float, memo_max: int = 10_000
    ) -> None:
        self.upstream = upstream
        self.prices = prices
        self.timeout_s = timeout_s
        self.memo_max = memo_max
        self.memo: OrderedDict[bytes, bool] = OrderedDict()

    async def confirm(
        self, model: str, memo: bytes, question: str, answer: str, headers: Headers
    ) -> Verdict:
        """Is `answer` an answer to `question`? Never raises."""
        known = self.memo.get(memo)
        if known is not None:
            self.memo.move_to_end(memo)
            return Verdict(known, cached=True)
        fwd: CIMultiDict[str] = CIMultiDict()
        for name in FORWARDED:
            for value in headers.getall(name, ()):
                fwd.add(name, value)
        fwd["Content-Type"] = "application/json"
        path = "/v1/chat/completions"
        body = judge_body(model, question, answer)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.upstream.request("POST", path, fwd, body) as resp:
                    status = resp.status
                    pieces: list[bytes] = []
                    size = 0
                    async for piece in resp.content.iter_any():
                        size += len(piece)
                        if size > ANSWER_MAX:
                            break
                        pieces.append(piece)
                    data = b"".join(pieces)
        except (UpstreamError, TimeoutError) as exc:
            ms = (time.perf_counter() - started) * 1000.0
            return Verdict(False, ms, error=f"verifier: {type(exc).__name__}")
        ms = (time.perf_counter() - started) * 1000.0
        if status != 200:
            return Verdict(False, ms, error=f"verifier answered {status}")
        said = judge_says(data)
        cost = self.prices.cost("/v1/chat/completions", model, _usage(data), {})
        usd = cost.usd if cost is not None else None
        if said is None:
            return Verdict(False, ms, usd, error="verifier said neither yes nor no")
        self.memo[memo] = said
        while len(self.memo) > self.memo_max:
            self.memo.popitem(last=False)
        return Verdict(said, ms, usd)


@dataclass(slots=True)
class Probe:
    """What one semantic lookup found (logged on the request's line)."""

    vector: np.ndarray | None = None
    sig: bytes = b""
    score: float | None = None
    """The best candidate's similarity after the guards (above the threshold: the best
    whose entry is still stored and fresh)."""
    member: str = ""
    entry: CachedResponse | None = None
    hit: bool = False
    """The best candidate clears the threshold (served in "on", would be in "shadow")."""
    guard: str | None = None
    """The guard that turned down a candidate above the threshold (guards.GUARDS)."""
    guard_score: float | None = None
    """That candidate's similarity."""
    error: str | None = None
    ms: float = 0.0
    embed_ms: float = 0.0
    embed_usd: float | None = None
    verdicts: list[Verdict] | None = None
    """The judge's verdicts on the candidates it was asked about (semantic_verify)."""

    def fields(self) -> dict[str, Any]:
        """The request.done fields."""
        out: dict[str, Any] = {"semantic_ms": round(self.ms, 2)}
        if self.score is not None:
            out["semantic_score"] = round(self.score, 4)
            out["semantic_hit"] = self.hit
        if self.guard:
            out["semantic_guard"] = self.guard
            if self.guard_score is not None:
                out["semantic_guard_score"] = round(self.guard_score, 4)
        if self.error:
            out["semantic_error"] = self.error
        if self.embed_usd:
            out["semantic_cost_usd"] = self.embed_usd
        if self.verdicts:
            last = self.verdicts[-1]
            out["semantic_verify"] = "yes" if last.ok else "no"
            out["semantic_verify_calls"] = sum(not v.cached for v in self.verdicts)
            out["semantic_verify_ms"] = round(sum(v.ms for v in self.verdicts), 2)
            usd = sum(v.usd or 0.0 for v in self.verdicts)
            if usd:
                out["semantic_verify_cost_usd"] = usd
            errors = [v.error for v in self.verdicts if v.error]
            if errors:
                out["semantic_verify_error"] = errors[-1][:200]
        return out


def _guarded(
    probe: Probe, mine: guards.Features, sig: bytes, score: float, threshold: float
) -> bool:
    """Does a guard refuse the candidate (a damaged record is refused too)? The first
    refusal of a candidate at or above the threshold is noted on the probe."""
    try:
        why = guards.refusal(mine, guards.unpack(sig))
    except (ValueError, struct.error, UnicodeDecodeError):
        why = "damaged"
    if why is None:
        return False
    if score >= threshold and probe.guard is None:
        probe.guard, probe.guard_score = why, score
    return True


class Semantic:
    """The lookup and the indexing, as the handler calls them."""

    def __init__(
        self,
        embedder: Embedder,
        index: VectorIndex,
        cache: Cache,
        mac_key: bytes,
        cpu: ThreadPoolExecutor,
        verifier: Verifier | None = None,
    ) -> None:
        self.verifier = verifier
        self.embedder = embedder
        self.index = index
        self.cache = cache
        self.mac_key = mac_key
        self.cpu = cpu
        self.indexed = 0
        """Answers indexed by this process (tests and benchmarks wait on it)."""

    async def probe(
        self,
        plan: Plan,
        text: str,
        *,
        tenant: bytes,
        namespace: str,
        headers: Headers,
        route: str,
        query: str,
        max_age: float | None,
    ) -> Probe:
        """Look for an entry that answers this request's meaning; never raises."""
        started = time.perf_counter()
        probe = Probe()
        try:
            await self._probe(probe, plan, text, tenant, namespace, headers, route, query, max_age)
        except EmbeddingFailed as exc:
            probe.error = str(exc)[:200]
        except StoreUnavailable:
            probe.error = "store unavailable"
        probe.ms = (time.perf_counter() - started) * 1000.0
        return probe

    async def _probe(
        self,
        probe: Probe,
        plan: Plan,
        text: str,
        tenant: bytes,
        namespace: str,
        headers: Headers,
        route: str,
        query: str,
        max_age: float | None,
    ) -> None:
        assert plan.semantic is not None and plan.rule is not None
        rule = plan.rule
        t0 = time.perf_counter()
        emb = await self.embedder.embed(
            rule.semantic_model,
            text,
            tenant=tenant,
            namespace=namespace,
            headers=headers,
            route=route,
            query=query,
            server=rule.semantic_embeddings_url,
        )
        probe.embed_ms = (time.perf_counter() - t0) * 1000.0
        probe.embed_usd = emb.cost_usd
        probe.vector = emb.vector
        mine = await self._features(text)
        probe.sig = guards.pack(mine)
        view = await self.index.sync(plan.semantic.partition)
        rows, dims = view.matrix.shape
        if rows == 0 or dims != emb.vector.shape[0]:
            return
        scores = await self._scores(view, emb.vector)
        prefix = plan.semantic.partition.rpartition(".")[0] + "."
        for row in top(scores, TOP_K):
            score = float(scores[row])
            if score < -1.0:
                break  # the rest are expired
            member = view.members[row]
            if not member.startswith(prefix):
                continue  # never another tenant's, namespace's, model's or route's entry
            if _guarded(probe, mine, view.sigs[row], score, rule.semantic_threshold):
                continue
            if score < rule.semantic_threshold:
                # below the threshold: its score is logged (shadow data), its entry not read
                probe.score, probe.member = score, member
                return
            entry = await self._live_entry(view, row, member, max_age)
            if entry is None:
                continue
            if not await self._confirmed(probe, plan, text, member, entry, headers, score):
                continue
            probe.score, probe.member, probe.entry, probe.hit = score, member, entry, True
            return

    async def _features(self, text: str) -> guards.Features:
        """The guard features of the request's text (taken off the loop when long)."""
        if len(text) > FEATURES_ON_LOOP:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.cpu, guards.features, text, self.mac_key)
        return guards.features(text, self.mac_key)

    async def _scores(self, view: View, vector: np.ndarray) -> np.ndarray:
        """Each indexed entry's similarity to `vector` (computed off the loop when large)."""
        rows, dims = view.matrix.shape
        now = CLOCK.now()
        if rows * dims > OFF_LOOP:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.cpu, view.scores, vector, now)
        return view.scores(vector, now)

    async def _live_entry(
        self, view: View, row: int, member: str, max_age: float | None
    ) -> CachedResponse | None:
        """The candidate's stored entry when fresh and young enough (a gone or expired one
        is dropped from the index view)."""
        entry = self.cache.peek(member)
        if entry is None:
            entry = await self.cache.get(member)
        if entry is None or entry.fresh_until < CLOCK.now():
            view.forget(row)
            return None
        if max_age is not None and CLOCK.now() - entry.created > max_age:
            return None
        return entry

    async def _confirmed(
        self,
        probe: Probe,
        plan: Plan,
        text: str,
        member: str,
        entry: CachedResponse,
        headers: Headers,
        score: float,
    ) -> bool:
        """The candidate passes the LLM verifier when the rule asks for one (a refusal is
        noted as the "verifier" guard)."""
        assert plan.rule is not None
        rule = plan.rule
        if not (rule.semantic == "on" and rule.semantic_verify == "llm"):
            return True
        if await self._verified(probe, plan, text, member, entry, headers):
            return True
        if probe.guard is None:
            probe.guard, probe.guard_score = "verifier", score
        return False

    async def _verified(
        self,
        probe: Probe,
        plan: Plan,
        text: str,
        member: str,
        entry: CachedResponse,
        headers: Headers,
    ) -> bool:
        """The judge confirms the candidate (no verifier configured, or no answer text: no)."""
        assert plan.rule is not None
        answer = answer_text(plan.twin or "chat", entry.body, entry.stream)
        if self.verifier is None or answer is None:
            return False
        memo = hashlib.blake2b(
            text.encode() + b"\0" + member.encode(), key=self.mac_key[:64], digest_size=16
        ).digest()
        verdict = await self.verifier.confirm(
            plan.rule.semantic_verify_model, memo, text, answer, headers
        )
        if probe.verdicts is None:
            probe.verdicts = []
        probe.verdicts.append(verdict)
        return verdict.ok

    async def remember(self, plan: Plan, probe: Probe, member: str, expires: float) -> None:
        """Index a stored answer under its request's vector (fail open)."""
        if probe.vector is None or plan.semantic is None:
            return
        record = pack(member, probe.sig, expires, probe.vector)
        try:
            await self.index.add(plan.semantic.partition, member, record, expires)
        except StoreUnavailable as exc:
            log.info("semantic.index_failed", error=str(exc)[:200])
            return
        self.indexed += 1

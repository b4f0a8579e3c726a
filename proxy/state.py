"""What a request needs from the running proxy: its collaborators (State, built once by
app.build_state and passed to each stage), and the request as it goes upstream (Forward)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, TypeVar

import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy.auth import CredentialCheck
from proxy.bus import RedisBus
from proxy.cache import Cache
from proxy.coalesce import Flights
from proxy.embeddings import ItemFlights
from proxy.fetch import Fetcher, Transform
from proxy.images.rehost import ImageRehoster, transform_for
from proxy.keys import mac_key
from proxy.log import RequestLog
from proxy.plan import Plan
from proxy.rules import Rules
from proxy.settings import Settings
from proxy.stats import Shared, Stats
from proxy.upstream import Upstream
from proxy.vectors import Semantic

log = structlog.get_logger()

T = TypeVar("T")
PARSERS = 2
"""Worker processes for large bodies (started on the first one)."""
OFF_LOOP_BYTES = 64 * 1024
"""Bodies larger than this are decoded, hashed and parsed on Workers.cpu, not on the loop."""


class Workers:
    """Where CPU-bound request work on large bodies runs, off the event loop: a small thread
    pool (decoding, hashing, parsing over OFF_LOOP_BYTES), and worker processes that plan
    the largest bodies (intake.PROCESS_BYTES), started on first use."""

    def __init__(self) -> None:
        self.cpu = ThreadPoolExecutor(2, thread_name_prefix="request-cpu")
        self.parsers: ProcessPoolExecutor | None = None
        self._starting: asyncio.Future[ProcessPoolExecutor | None] | None = None

    async def parser_pool(self) -> ProcessPoolExecutor | None:
        """The worker processes that plan large bodies, started (off the loop) on first use;
        None if they cannot be started (large bodies are then planned on `cpu`)."""
        if self.parsers is not None:
            return self.parsers
        if self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.to_thread(_start_parsers))
        pool = await asyncio.shield(self._starting)
        if self.parsers is None:
            self.parsers = pool
        return pool

    def parsers_broken(self) -> None:
        """A worker died (killed, out of memory): the next large body starts new ones."""
        pool, self.parsers, self._starting = self.parsers, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)
        if self.parsers is not None:
            self.parsers.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class Planner:
    """What the intake stage needs of the running proxy, and nothing else: the rules, the
    key secrets, the body cap, the plan memo, and the workers for large bodies."""

    rules: Rules
    secret: bytes
    max_body: int
    """settings.max_body_bytes."""
    max_body_mb: float
    idempotency_ttl_s: float
    workers: Workers
    mac_key: bytes = b""
    """Key of the per-request BLAKE2b digests (tenant, raw body), derived from `secret`."""
    plans: dict[bytes, tuple[Plan, bytes, str]] = field(default_factory=dict)
    """Memo: raw request digest -> (plan, tenant digest, tenant id for logs)."""

    def __post_init__(self) -> None:
        self.mac_key = mac_key(self.secret)

    def rekey(self, secret: bytes) -> None:
        """Make keys and tenant ids with `secret` from now on; plans made with the old one
        are forgotten."""
        self.secret = secret
        self.mac_key = mac_key(secret)
        self.plans.clear()


@dataclass(slots=True)
class State:
    """The collaborators of the data path's stages, built once by app.build_state. The
    intake stage is handed only its own (`planner`)."""

    settings: Settings
    planner: Planner
    cache: Cache
    upstream: Upstream
    flights: Flights
    fetcher: Fetcher
    stats: Stats
    converted: dict[tuple[str, float, str], bytes] = field(default_factory=dict)
    """Twins converted to the other form, newest last (hit.twin)."""
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
    items: ItemFlights = field(default_factory=ItemFlights)
    """Embeddings input items being fetched (embeddings.py)."""

    def __post_init__(self) -> None:
        if self.rehoster is not None:
            self.transform = transform_for(self.rehoster)

    @property
    def workers(self) -> Workers:
        """Where CPU-bound work on large bodies runs (the planner's)."""
        return self.planner.workers


class Forward(NamedTuple):
    """One client request as the data path forwards it upstream."""

    request: web.BaseRequest
    body: bytes
    """As read (and decoded from its Content-Encoding)."""
    fwd: CIMultiDict[str]
    """The headers that go upstream."""
    path_qs: str
    """The upstream path and query."""
    t0: float
    """When the request arrived (time.perf_counter)."""


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


async def off_loop(
    workers: Workers, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """Run CPU-bound request work (decoding, hashing, parsing) off the event loop when the
    body is large, on a small pool, so one huge or hostile body never stalls other requests."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(workers.cpu, partial(fn, *args, **kwargs))

"""Cross-instance flights through Redis: one upstream call per key across every instance.

The instance that wins the lease (`SET lease token NX PX`) leads: it fetches upstream as usual
and mirrors its flight into a Redis Stream (head, chunks, then an end entry), renewing the
lease at a third of its life through a compare-token script and releasing it the same way.
A leader that cannot renew has lost the lease and stops publishing.

Every other instance follows: it reads that stream from its first entry with blocking reads
and feeds a local flight, which its own duplicates join as usual. If the lease vanishes with
no end entry (the leader died), exactly one follower wins the lease and fetches again; a
follower whose clients already got part of the dead leader's answer ends them with a cut.

The lease is for efficiency, not correctness (stored answers are idempotent), so a single
Redis is enough (no Redlock). A lease key and its stream share a Redis Cluster hash slot
({key} hash tags); both always carry a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson
import structlog

from proxy.coalesce import Flight, Outcome
from proxy.errors import BusError
from proxy.keys import key_id
from proxy.status import Failure
from proxy.stores.redis import RACES
from proxy.tasks import spawn

log = structlog.get_logger()

RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
PUBLISH = """
local id = redis.call('xadd', KEYS[1], '*', unpack(ARGV, 2))
redis.call('pexpire', KEYS[1], ARGV[1])
return id
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Local:
    """Lead in this process only: no bus, or Redis failed."""


@dataclass(frozen=True, slots=True)
class Leader:
    """This instance leads for every instance; the lease's token."""

    token: str


@dataclass(frozen=True, slots=True)
class Follow:
    """Another instance leads: follow its stream."""

    form: str | None = None
    """The form of the leader's answer, for an Idempotency-Key flight (None: not said)."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """Another instance leads this Idempotency-Key with another request body."""


Leadership = Local | Leader | Follow | Conflict
LOCAL, FOLLOW, CONFLICT = Local(), Follow(), Conflict()


class Followed(Enum):
    """How following another instance's flight ended."""

    DONE = "done"
    ORPHANED = "orphaned"
    """The leader vanished before finishing."""
    BUS_FAILED = "bus failed"
    """Redis failed while following."""


class RedisBus:
    """Leases and answer streams between instances, over the Redis store's blocking client
    (borrowed: the store closes it)."""

    def __init__(
        self,
        client: Any,
        *,
        ready: Callable[[], Awaitable[None]] | None = None,
        prefix: str = "ocp",
        lease_s: float = 5.0,
        stream_ttl_s: float = 60.0,
        block_s: float = 0.25,
        breaker_s: float = 5.0,
    ) -> None:
        self.client = client
        self._ready = ready
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.stream_ttl_ms = int(stream_ttl_s * 1000)
        self.block_ms = int(block_s * 1000)
        self.breaker_s = breaker_s
        self.down_until = 0.0

    @property
    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def lease_key(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:lease"

    def stream_key(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:stream"

    async def _call(self, call: Callable[[], Awaitable[Any]], *, retry: bool = True) -> Any:
        """One client call; anything it raises (the cluster client raises AttributeError and
        RuntimeError during a cold start or a reshard) is the bus failing: BusError. Those
        races get one immediate retry first, for commands that may run twice (`retry`)."""
        try:
            if self._ready is not None:
                await self._ready()
            try:
                return await call()
            except RACES:
                if not retry:
                    raise
                return await call()
        except Exception as exc:
            if self.usable:
                log.warning("bus.unavailable", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            self.down_until = time.monotonic() + self.breaker_s
            raise BusError(str(exc)) from exc

    async def lead(self, key: str, fingerprint: str, form: str = "") -> Leadership:
        """Who fetches `key`: this instance for all (Leader), another one (Follow, or
        Conflict for an Idempotency-Key it leads with another body), or this process alone
        because Redis failed (Local). An Idempotency-Key flight is one for every form of its
        request: the lease says the leader's `form`, which Follow carries. Never raises."""
        if not self.usable:
            return LOCAL
        try:
            token = await self.try_lead(key, fingerprint, form)
            if token is not None:
                return Leader(token)
            if fingerprint:
                led = await self.led(key)
                if led is not None and led[0] != fingerprint:
                    return CONFLICT
                return Follow(led[1] if led is not None else None)
        except BusError:
            return LOCAL  # Redis is down: coalesce in this process only
        return FOLLOW

    async def try_lead(self, key: str, fingerprint: str = "", form: str = "") -> str | None:
        """A token if this instance now holds the lease for `key`, else None. The token ends
        with the request's fingerprint and form (Idempotency-Key flights), see `led`."""
        token = secrets.token_hex(16) + "/" + fingerprint + ("/" + form if form else "")
        got = await self._call(
            lambda: self.client.set(self.lease_key(key), token, nx=True, px=self.lease_ms)
        )
        if not got:
            return None
        # A new leader starts a new stream: entries of a dead leader must not be replayed.
        await self._call(lambda: self.client.delete(self.stream_key(key)))
        return token

    async def conflicts(self, key: str, fingerprint: str) -> bool:
        """Does the instance leading `key` serve another request than `fingerprint`? (The same
        Idempotency-Key reused with another body while the first is still in flight.)"""
        value = await self._call(lambda: self.client.get(self.lease_key(key)))
        if value is None:
            return False
        led = value.decode() if isinstance(value, bytes) else str(value)
        return led.split("/")[1:2] != [fingerprint]

    async def led(self, key: str) -> tuple[str, str | None] | None:
        """(fingerprint, form or None) of the request the instance leading `key` serves, or
        None when nobody leads it now."""
        value = await self._call(lambda: self.client.get(self.lease_key(key)))
        if value is None:
            return None
        parts = (value.decode() if isinstance(value, bytes) else str(value)).split("/")
        return (parts[1] if len(parts) > 1 else ""), (parts[2] if len(parts) > 2 else None)

    async def renew(self, key: str, token: str) -> bool:
        done = await self._call(
            lambda: self.client.eval(RENEW, 1, self.lease_key(key), token, self.lease_ms)
        )
        return bool(done)

    async def release(self, key: str, token: str) -> None:
        await self._call(lambda: self.client.eval(RELEASE, 1, self.lease_key(key), token))

    async def lease_alive(self, key: str) -> bool:
        return bool(await self._call(lambda: self.client.exists(self.lease_key(key))))

    async def publish(self, key: str, fields: dict[str, bytes | str | int]) -> None:
        """XADD and PEXPIRE in one script: the stream never exists without a TTL."""
        args: list[bytes | str | int] = [self.stream_ttl_ms]
        for name, value in fields.items():
            args += [name, value]
        stream = self.stream_key(key)
        await self._call(lambda: self.client.eval(PUBLISH, 1, stream, *args), retry=False)

    async def read(self, key: str, last_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
        got = await self._call(
            lambda: self.client.xread(
                {self.stream_key(key): last_id}, block=self.block_ms, count=512
            )
        )
        if not got:
            return []
        entries: list[tuple[str, dict[bytes, bytes]]] = []
        for _stream, items in got:
            for entry_id, fields in items:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entries.append((eid, fields))
        return entries

    # -- leader side ----------------------------------------------------------------------------
    async def mirror(self, flight: Flight, key: str, token: str) -> None:
        """Publish a local flight to the stream while renewing the lease; release at the end."""
        reader = flight.attach()
        lost = asyncio.Event()
        renewer = spawn(self._renew_loop(key, token, lost), name=f"lease:{key_id(key)}")
        try:
            await flight.wait_head(None)
            if flight.head is not None:
                await self.publish(
                    key,
                    {"t": "h", "s": flight.head.status, "h": orjson.dumps(flight.head.headers)},
                )
            async for chunk in reader.chunks():
                if lost.is_set():
                    return
                await self.publish(key, {"t": "c", "d": chunk})
            if not lost.is_set():
                outcome = (
                    "ok" if flight.outcome is Outcome.COMPLETE and not flight.overflow else "cut"
                )
                await self.publish(key, {"t": "e", "o": outcome})
        except BusError:
            pass  # followers see the lease go without an end entry and take over
        finally:
            reader.close()
            # Hold the lease until the answer is stored, or a newcomer on another instance
            # could find neither the lease nor the stored answer, and fetch again: the read,
            # then the store task it hands the answer to (flight.task, in turn).
            while (task := flight.task) is not None and not task.done():
                await asyncio.wait({task})
            renewer.cancel()
            if not lost.is_set():
                with contextlib.suppress(BusError):
                    await self.release(key, token)

    async def _renew_loop(self, key: str, token: str, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000.0)
            try:
                if not await self.renew(key, token):
                    log.warning("bus.lease_lost", key=key_id(key))
                    lost.set()
                    return
            except BusError:
                lost.set()
                return

    # -- follower side --------------------------------------------------------------------------
    async def follow(self, flight: Flight, key: str) -> Followed:
        """Feed `flight` from the leader's stream, until it is DONE, or ORPHANED when the
        leader vanished without finishing (the flight is left as it is for the caller)."""
        last = "0-0"
        while True:
            entries = await self.read(key, last)
            if not entries:
                if await self.lease_alive(key):
                    continue
                entries = await self.read(key, last)  # anything written just before it died
                if not entries:
                    return Followed.ORPHANED
            for entry_id, fields in entries:
                last = entry_id
                kind = fields.get(b"t")
                if kind == b"h":
                    headers = tuple(tuple(h) for h in orjson.loads(fields[b"h"]))
                    flight.publish_head(int(fields[b"s"]), headers)
                elif kind == b"c":
                    flight.append(fields[b"d"])
                elif kind == b"e":
                    ok = fields.get(b"o") == b"ok"
                    if ok:
                        flight.finish(Outcome.COMPLETE)
                    else:
                        detail = "the leading instance's answer broke off"
                        flight.finish(Outcome.CUT, Failure.UPSTREAM_CUT, detail)
                    return Followed.DONE

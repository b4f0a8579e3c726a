"""The semantic index's memory cap holds, measured as the process's resident memory: one
large partition, ten first loads at once, and a client inventing namespaces."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from proxy.cache import Cache
from proxy.guards import features, pack
from proxy.models import CachedResponse
from proxy.stores import MemoryStore
from proxy.vectors import PART_FLOOR, VectorIndex, top
from proxy.vectors import pack as pack_record

MIB = 1024 * 1024
CAP = 2 * MIB
MARGIN = 16 * MIB
"""Besides the cap: a page of records being read, the allocator's slack, numpy's temporaries."""
DIMS = 384  # multilingual-e5-small
SIG = pack(features("How much ibuprofen can my elderly mother take with 500 mg of food?", b"k"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The highest resident memory seen (sampled every few ms) above what it was before."""
    gc.collect()
    base = rss()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss() - base)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], rss() - base)


async def filled(parts: dict[str, int]) -> Cache:
    """A store holding `n` index records (and their entries) for each partition."""
    store = MemoryStore(max_bytes=4096 * MIB)
    rng = np.random.default_rng(7)
    entry = CachedResponse(status=200, headers=(), body=b"{}", created=time.time(), stream=False)
    later = time.time() + 3600
    for part, n in parts.items():
        vectors = rng.standard_normal((n, DIMS)).astype(np.float32)
        for i in range(n):
            member = f"{part}.{i:08d}"
            await store.set(member, entry, 3600)
            await store.vectors_add(
                part, member, pack_record(member, SIG, later, vectors[i]), later, 10**9
            )
    return Cache(store)


def consistent(index: VectorIndex) -> None:
    assert index.bytes == sum(p.counted for p in index.parts.values())
    assert 0 <= index.bytes <= CAP + max((p.nbytes for p in index.parts.values()), default=0)


async def test_a_single_partition_is_capped() -> None:
    """One partition of 40 MB of vectors is kept to the newest rows that fit in the cap."""
    cache = await filled({"v2:t.n.m.r.s1": 20_000})
    index = VectorIndex(cache, keep=100_000, max_bytes=CAP)
    with peak_rss() as peak:
        view = await index.sync("v2:t.n.m.r.s1")
    held = index.parts["v2:t.n.m.r.s1"]
    assert held.nbytes <= CAP and index.bytes <= CAP
    assert view.members[-1] == "v2:t.n.m.r.s1.00019999"  # the newest kept
    consistent(index)
    assert peak[0] <= CAP + MARGIN, f"{peak[0] / MIB:.1f} MiB"


async def test_ten_concurrent_first_loads_stay_within_the_cap() -> None:
    """Ten partitions loaded at once (each 5 MB of vectors) hold the cap plus a margin at
    their peak, and the count of bytes never goes negative."""
    names = [f"v2:t.n{i}.m.r.s" for i in range(10)]
    cache = await filled(dict.fromkeys(names, 3000))
    index = VectorIndex(cache, keep=100_000, max_bytes=CAP)
    query = np.ones(DIMS, dtype=np.float32) / np.sqrt(DIMS)

    async def lookup(name: str) -> int:
        """What a probe does with a view: score it, then read an entry (an await) holding it."""
        view = await index.sync(name)
        best = top(view.scores(query, time.time()), 8)
        await asyncio.sleep(0.01)
        return len(best)

    with peak_rss() as peak:
        found = await asyncio.gather(*(lookup(n) for n in names))
    assert found == [8] * 10
    consistent(index)
    for n in names:  # again, now incremental: still consistent
        await index.sync(n)
        consistent(index)
    assert peak[0] <= CAP + MARGIN, f"{peak[0] / MIB:.1f} MiB"


async def test_many_namespaces_are_bounded_in_number() -> None:
    """A client inventing 5000 namespaces (each a new partition, some with records) leaves a
    bounded number of partitions and the bytes within the cap."""
    names = [f"v2:t.x{i}.m.r.s" for i in range(5000)]
    cache = await filled({n: 3 for n in names[::10]})
    index = VectorIndex(cache, keep=100_000, max_bytes=CAP)
    with peak_rss() as peak:
        for chunk in range(0, len(names), 100):
            await asyncio.gather(*(index.sync(n) for n in names[chunk : chunk + 100]))
            consistent(index)
    assert len(index.parts) <= CAP // PART_FLOOR + 1
    assert 0 <= index.bytes <= CAP
    assert peak[0] <= CAP + MARGIN, f"{peak[0] / MIB:.1f} MiB"


def test_one_tenant_inventing_namespaces_through_the_proxy(
    start_proxy: Any, tmp_path: Path
) -> None:
    """One tenant sending 200 new X-Cache-Namespace values through the proxy leaves the index
    within --semantic-memory-mb, with a bounded number of partitions."""
    from tests.conftest import sdk

    rules = tmp_path / "semantic.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\nsemantic = "on"\n')
    proxy = start_proxy(rules=rules, semantic_memory_mb=0.25)
    client = sdk(proxy)
    for i in range(200):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            extra_headers={"X-Cache-Namespace": f"ns-{i}"},
        )
    index = proxy.state.semantic.index
    assert len(index.parts) <= (0.25 * MIB) // PART_FLOOR + 1
    assert 0 <= index.bytes <= 0.25 * MIB
    assert index.bytes == sum(p.counted for p in index.parts.values())

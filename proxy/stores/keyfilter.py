"""KeyFilter: a Bloom filter of the keys a store file holds, asked on the event loop.

A MISS on the embedded store used to ask SQLite whether its key was there. That call gives
the GIL to the store thread and waits to get it back, about 30 us of the loop's time under
load. The filter answers "surely absent" for most new keys without leaving Python: it is
never wrong about a key that was added (no false negatives) and wrong about about 1 % of the
others (they are then looked up in the file, as before). Keys are hashed with Python's own
string hash (random per process); they are HMACs, so no client can aim at a bit.
"""

from __future__ import annotations

BITS_PER_KEY = 10
PROBES = 4
"""Bits set per key: with 10 bits a key, about 1 % false positives at capacity."""
MIN_CAPACITY = 65_536
"""80 KB of bits: the smallest filter made."""


class KeyFilter:
    """`maybe(key)` is False only for a key never `add`ed."""

    __slots__ = ("_size", "bits", "capacity", "count")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(MIN_CAPACITY, capacity)
        """Keys it holds at its false-positive rate; past it, its owner makes a larger one."""
        self.bits = bytearray(self.capacity * BITS_PER_KEY // 8)
        self._size = len(self.bits) * 8
        self.count = 0
        """Keys added that set a bit (a key added again, as the store's own writes are when
        it reads the file after them, does not count twice)."""

    def _positions(self, key: str) -> list[int]:
        """The key's PROBES bits (double hashing of its 64-bit hash)."""
        h = hash(key)
        a, b, size = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1, self._size
        return [(a + i * b) % size for i in range(PROBES)]

    def add(self, key: str) -> None:
        bits, new = self.bits, False
        for p in self._positions(key):
            mask = 1 << (p & 7)
            if not bits[p >> 3] & mask:
                bits[p >> 3] |= mask
                new = True
        self.count += new

    def maybe(self, key: str) -> bool:
        """The bits of _positions, stopping at the first clear one: this is on every MISS,
        where most keys are new (300 ns; building the list first took 860)."""
        h = hash(key)
        a, b, size, bits = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1, self._size, self.bits
        for i in range(PROBES):
            p = (a + i * b) % size
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    @property
    def full(self) -> bool:
        return self.count > self.capacity

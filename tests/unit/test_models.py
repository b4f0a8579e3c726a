"""models.py on its own: the stored answer format."""

from __future__ import annotations

import pytest

from proxy.models import CachedResponse


def test_cached_response_roundtrip_and_compression() -> None:
    """to_bytes/from_bytes keep every field; large bodies are compressed."""
    small = CachedResponse(
        200, (("Content-Type", "application/json"),), b"{}", 1.5, meta={"cost": {"tokens_in": 1}}
    )
    assert CachedResponse.from_bytes(small.to_bytes()) == small
    big = CachedResponse(
        200,
        (),
        b"data: x\n\n" * 5000,
        2.0,
        stream=True,
        chunk_ends=(9, 45000),
        chunk_ms=(0.0, 12.5),
        upstream_ms=99.0,
    )
    raw = big.to_bytes()
    assert raw.startswith(b"OCZ1") and len(raw) < len(big.body) / 10
    back = CachedResponse.from_bytes(raw)
    assert back == big and back.chunks() == [big.body[:9], big.body[9:]]
    with pytest.raises(ValueError):
        CachedResponse.from_bytes(b"junk")

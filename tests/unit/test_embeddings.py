"""embeddings: which inputs go item by item, the item keys, and the answer's pieces."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.embeddings import assemble, item_keys, per_item, shares, split_answer, status_of
from proxy.status import COALESCED, HIT, MISS, PARTIAL

ARGS = (b"secret", b"t" * 32, "POST", "/v1/embeddings", "", "")


def keys(body: dict[str, Any], tenant: bytes = b"t" * 32) -> list[str]:
    args = (ARGS[0], tenant, *ARGS[2:])
    return item_keys(*args, "m", ("user",), orjson.dumps(body)).keys


def test_which_inputs_go_item_by_item() -> None:
    """Lists of 2..2048 strings or token arrays do; one string, one token array, a list of
    one, an over-long list or mixed junk do not."""
    assert per_item({"input": ["a", "b"]})
    assert per_item({"input": [[1, 2], [3]]})
    assert not per_item({"input": "a"})
    assert not per_item({"input": [1, 2, 3]})
    assert not per_item({"input": ["a"]})
    assert not per_item({"input": ["a"] * 2049})
    assert not per_item({"input": ["a", {"x": 1}]})
    assert not per_item({"input": [[1, True], [2]]})


def test_item_keys_cover_every_other_field() -> None:
    """An item's key is the same in any list, and changes with the model, dimensions,
    encoding format or tenant, not with an ignored field; "float" is the default format."""
    base = {"model": "m", "input": ["x", "y"], "dimensions": 8}
    assert keys(base)[0] == keys({**base, "input": ["z", "x"]})[1]
    assert keys(base)[0] != keys({**base, "dimensions": 16})[0]
    assert keys(base)[0] != keys({**base, "encoding_format": "base64"})[0]
    assert keys(base)[0] == keys({**base, "encoding_format": "float"})[0]
    assert keys(base)[0] == keys({**base, "user": "u"})[0]
    assert keys(base)[0] != keys({**base, "model": "n"})[0]
    assert keys(base)[0] != keys(base, tenant=b"u" * 32)[0]


def test_split_and_assemble_round_trip() -> None:
    """An answer is split into items by index (whatever their order), and assembled back
    into OpenAI's shape; a wrong count or a duplicate index is no answer."""
    answer: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": "AAA="},
            {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]},
        ],
        "model": "m",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    split = split_answer(orjson.dumps(answer), 2)
    assert split is not None
    items, usage, model = split
    assert items == [b"[0.5,-1.0]", b'"AAA="'] and usage["prompt_tokens"] == 3 and model == "m"
    doc = orjson.loads(assemble(items, model, usage))
    assert doc["data"] == sorted(answer["data"], key=lambda d: d["index"])
    assert doc["usage"] == usage and doc["object"] == "list"
    assert split_answer(orjson.dumps(answer), 3) is None
    answer["data"][0]["index"] = 0
    assert split_answer(orjson.dumps(answer), 2) is None
    assert split_answer(b"not json", 2) is None


def test_status_and_shares() -> None:
    """HIT, COALESCED, MISS, PARTIAL by where the items came from; shares sum to the call."""
    assert status_of(3, 0, 0) is HIT
    assert status_of(0, 2, 0) is COALESCED
    assert status_of(0, 0, 3) is MISS
    assert status_of(1, 0, 2) is PARTIAL and status_of(0, 1, 1) is PARTIAL
    assert sum(shares(17, [1, 5, 9])) == 17 and shares(10, [1, 1]) == [5, 5]

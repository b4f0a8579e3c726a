"""Hostile bodies against the pure request side: normaliser, key, body decoding, link rules."""

from __future__ import annotations

import gzip
import json  # noqa: TID251 - stdlib writes integers of any size, which orjson refuses to
import zlib
from typing import Any

import brotli
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.body import decodable, decode
from proxy.errors import BadBody, BodyTooLarge, CorruptEntry, TooDeep, TooManyParts
from proxy.images.base import PLACEHOLDER_BASE, client_base, rebase
from proxy.images.local import LocalImageStore
from proxy.images.rehost import ImageRehoster
from proxy.keys import Scope, credential_of, mac_key, tenant_digest
from proxy.models import CachedResponse
from proxy.normalize import MAX_DEPTH
from proxy.plan import Plan, make_plan
from proxy.record import LABEL_MAX
from proxy.rules import default_rules_path, load_rules

RULES = load_rules(default_rules_path())
SECRET = b"unit-secret"
TENANT = tenant_digest(mac_key(SECRET), "Bearer sk-a", "", "")
CHAT = "/v1/chat/completions"


def plan(body: bytes, ctype: str = "application/json", route: str = CHAT) -> Plan:
    return make_plan(RULES, Scope(SECRET, TENANT, "POST", route, ""), "", ctype, body)


def chat(content: str, **extra: object) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}
    return json.dumps(body).encode()


def test_every_credential_header_enters_the_tenant() -> None:
    """Authorization and api-key (and x-api-key) all count, every value of each."""
    one = credential_of(CIMultiDict({"Authorization": "Bearer sk-a", "api-key": "k1"}))
    two = credential_of(CIMultiDict({"Authorization": "Bearer sk-a", "api-key": "k2"}))
    only_auth = credential_of(CIMultiDict({"Authorization": "Bearer sk-a"}))
    repeated = CIMultiDict([("api-key", "k1"), ("api-key", "k2")])
    assert len({one, two, only_auth, credential_of(repeated)}) == 4
    moved = credential_of(CIMultiDict({"api-key": "Bearer sk-a"}))
    assert moved != only_auth  # the same value under another header is another tenant


def test_json_is_keyed_by_content_whatever_the_content_type() -> None:
    """curl -d (form encoding) and text/plain JSON bodies get the key of their content."""
    a, b = chat("first prompt"), chat("second prompt")
    for ctype in ("application/x-www-form-urlencoded", "text/plain", ""):
        assert plan(a, ctype).key == plan(a).key
        assert plan(b, ctype).key != plan(a, ctype).key
        assert plan(a, ctype).model == "gpt-4o-mini"


def test_a_body_with_no_canonical_form_is_keyed_by_its_exact_bytes() -> None:
    """Two different unparsable bodies never share a key, and neither is keyed as `{}`."""
    empty = plan(b"{}").key
    one, two = plan(b"not json 1", "text/plain").key, plan(b"not json 2", "text/plain").key
    assert len({empty, one, two}) == 3
    assert plan(b"not json 1", "text/csv").key != one  # the type is part of it


def test_declared_json_that_does_not_parse_is_a_400() -> None:
    """A body declared as JSON that does not parse, or is not an object, is refused as BadBody."""
    with pytest.raises(BadBody):
        plan(b'{"model": ')
    with pytest.raises(BadBody):
        plan(b"[1, 2]")


def test_integers_past_64_bits_keep_their_exact_value() -> None:
    """orjson reads them as floats; two seeds one apart must still get two keys."""
    keys = {plan(chat("x", seed=2**64 + n)).key for n in range(3)}
    assert len(keys) == 3
    assert plan(chat("x", seed=2**53 + 1)).key != plan(chat("x", seed=2**53)).key
    assert plan(chat("x", seed=7.0)).key == plan(chat("x", seed=7)).key  # still unified below


def test_nesting_is_bounded_with_a_400() -> None:
    """Past MAX_DEPTH (and past orjson's own limit) the body is a clear 400, never a crash."""
    ok = b'{"model":"m","x":' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}"
    assert plan(ok).key
    for depth in (MAX_DEPTH + 5, 300, 5000):
        deep = b'{"model":"m","x":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(BadBody) as err:
            plan(deep)
        assert err.value.status == 400
    with pytest.raises(TooDeep):
        plan(b'{"model":"m","x":' + b"[" * 300 + b"]" * 300 + b"}")


def test_multipart_part_count_is_bounded() -> None:
    """A multipart body with too many parts is refused with TooManyParts."""
    boundary = "b0undary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'
    body = (part * 20_000 + f"--{boundary}--\r\n").encode()
    with pytest.raises(TooManyParts):
        plan(body, f"multipart/form-data; boundary={boundary}", "/v1/images/edits")


def test_labels_from_the_body_are_bounded() -> None:
    """A megabyte model name is cut for labels, logs and memos (the key still sees it all)."""
    huge = "m" * 1_000_000
    p = plan(orjson.dumps({"model": huge, "messages": []}))
    q = plan(orjson.dumps({"model": huge + "x", "messages": []}))
    assert p.model is not None and len(p.model) == LABEL_MAX
    assert p.key != q.key
    images = plan(
        orjson.dumps({"prompt": "p", "size": "s" * 100_000}), route="/v1/images/generations"
    )
    assert images.hints is not None and len(images.hints["size"]) <= 32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=2048),
    ctype=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "",
            "multipart/form-data; boundary=x",
            "multipart/form-data",
        ]
    ),
)
def test_arbitrary_bytes_raise_nothing_but_bad_body(body: bytes, ctype: str) -> None:
    """Whatever the bytes, the planner answers a plan or the proxy's own bad-body error."""
    try:
        p = plan(body, ctype)
    except BadBody:
        return
    assert p.key.startswith("v2:")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(a=JSON, b=JSON, field=st.sampled_from(["messages", "temperature", "seed", "tools", "x"]))
def test_bodies_that_differ_in_a_kept_field_never_share_a_key(a: Any, b: Any, field: str) -> None:
    """Two JSON bodies differing in a non-ignored field never share a key (integers of any
    size included); the same bytes always give the same key."""
    one = json.dumps({"model": "gpt-4o-mini", field: a}).encode()
    two = json.dumps({"model": "gpt-4o-mini", field: b}).encode()
    try:
        ka, kb = plan(one).key, plan(two).key
    except BadBody:
        return
    if json.loads(one) != json.loads(two):
        assert ka != kb
    assert plan(one).key == ka


@settings(max_examples=150, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.sampled_from(["prompt", "n", "size", "image[]"]), st.binary(max_size=40)),
        max_size=6,
    ),
    boundary=st.sampled_from(["abc", "----x123", "b"]),
)
def test_multipart_bodies_raise_nothing_but_bad_body(
    fields: list[tuple[str, bytes]], boundary: str
) -> None:
    """Any multipart body, however broken, plans or raises BadBody, never another exception."""
    body = (
        b"".join(
            b"--"
            + boundary.encode()
            + b'\r\nContent-Disposition: form-data; name="'
            + name.encode()
            + b'"\r\n\r\n'
            + value
            + b"\r\n"
            for name, value in fields
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    try:
        p = plan(body, f"multipart/form-data; boundary={boundary}", "/v1/images/edits")
    except BadBody:
        return
    assert p.key


def test_encoded_bodies_decode_capped_while_decoding() -> None:
    """gzip, deflate (zlib and raw), br and stacked codings decode; a bomb stops at the cap."""
    data = b'{"model":"m"}' * 100
    raw_deflate = zlib.compressobj(wbits=-15)
    assert decode(gzip.compress(data), "gzip", 10_000) == data
    assert decode(zlib.compress(data), "deflate", 10_000) == data
    assert decode(raw_deflate.compress(data) + raw_deflate.flush(), "deflate", 10_000) == data
    assert decode(brotli.compress(data), "br", 10_000) == data
    assert decode(brotli.compress(gzip.compress(data)), "gzip, br", 10_000) == data
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    with pytest.raises(BodyTooLarge):
        decode(bomb, "gzip", 1024 * 1024)
    with pytest.raises(BodyTooLarge):
        decode(brotli.compress(b"\0" * (64 * 1024 * 1024)), "br", 1024 * 1024)
    with pytest.raises(BadBody):
        decode(b"not gzip", "gzip", 1000)
    with pytest.raises(BadBody):
        decode(gzip.compress(data)[:-10], "gzip", 10_000)
    assert not decodable("zstd") and decodable("identity") and decodable("x-gzip")


def test_a_damaged_entry_is_a_corrupt_entry_and_nothing_else() -> None:
    """Any damage (zlib, JSON, types, lengths) raises CorruptEntry, a ValueError."""
    good = CachedResponse(200, (("a", "b"),), b"x" * 20000, 1.0).to_bytes()
    damaged = [b"", b"OCZ1garbage", b"OCP1\0\0\0\x05{}xx", good[:50], b"OCP1\0\0\0\x02[]"]
    damaged.append(b"OCP1" + (12).to_bytes(4, "big") + b'{"s":"x"}   ')
    for raw in damaged:
        with pytest.raises(CorruptEntry):
            CachedResponse.from_bytes(raw)
    assert CachedResponse.from_bytes(good).body == b"x" * 20000


def test_image_source_hosts_check_ports() -> None:
    """A bare host allows its scheme's default port only; host:port allows that port."""
    r = ImageRehoster(
        LocalImageStore(__import__("pathlib").Path("/nonexistent")),
        allowed_hosts="img.example,cdn.example:8443",
    )
    assert r.allows("https://img.example/a.png") and r.allows("http://img.example:80/a.png")
    assert not r.allows("https://img.example:8443/a.png")
    assert not r.allows("http://img.example:6379/a.png")
    assert r.allows("https://cdn.example:8443/a.png")
    assert not r.allows("https://cdn.example/a.png")
    assert not r.allows("https://img.example:99999/a.png")


def test_image_links_follow_the_client_and_a_forged_host_reaches_nobody() -> None:
    """Image links are rebased on the client's own base URL, and a forged Host header falls back to
    the configured base."""
    body = orjson.dumps({"data": [{"url": PLACEHOLDER_BASE + "/_proxy/images/a.png"}]})
    assert b"http://localhost:1/_proxy" in rebase(body, client_base("http", "localhost:1", "x"))
    forged = client_base("http", 'evil.example/"><script>', "http://127.0.0.1:9")
    assert forged == "http://127.0.0.1:9"
    assert client_base("https", "[::1]:8080", "x") == "https://[::1]:8080"

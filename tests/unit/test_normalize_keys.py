"""Canonical bodies and keys: pure functions."""

from __future__ import annotations

from proxy.keys import cache_key, raw_digest, tenant_digest
from proxy.normalize import canonical_json, canonical_multipart, drop_ignored
from proxy.rules import DEFAULT_IGNORE


def test_canonical_form_ignores_order_whitespace_and_number_spelling():
    """Sorted keys, one spelling per number: 1 and 1.0 are one value, 0.5 stays 0.5."""
    a = canonical_json({"b": 1, "a": [1.0, {"y": 2.0, "x": 0.5}]}, ())
    b = canonical_json({"a": [1, {"x": 0.5, "y": 2}], "b": 1.0}, ())
    assert a == b == b'{"a":[1,{"x":0.5,"y":2}],"b":1}'


def test_ignore_list_drops_fields_and_dotted_paths():
    """Default ignores drop user/metadata and stream_options.include_obfuscation only."""
    body = {
        "model": "m",
        "user": "u",
        "metadata": {"k": "v"},
        "stream_options": {"include_obfuscation": False},
        "temperature": 0,
    }
    assert drop_ignored(body, DEFAULT_IGNORE) == {"model": "m", "temperature": 0}
    kept = drop_ignored(
        {"stream_options": {"include_usage": True, "include_obfuscation": True}}, DEFAULT_IGNORE
    )
    assert kept == {"stream_options": {"include_usage": True}}


def test_multipart_canonical_form_keys_files_by_content_in_order():
    """Files are keyed by their bytes; image[] order matters; file names do not."""
    one = [("prompt", None, b"hat"), ("image[]", "a.png", b"A"), ("image[]", "b.png", b"B")]
    renamed = [("image[]", "x.png", b"A"), ("prompt", None, b"hat"), ("image[]", "y.png", b"B")]
    swapped = [("prompt", None, b"hat"), ("image[]", "a.png", b"B"), ("image[]", "b.png", b"A")]
    assert canonical_multipart(one, ()) == canonical_multipart(renamed, ())
    assert canonical_multipart(one, ()) != canonical_multipart(swapped, ())
    assert canonical_multipart([*one, ("user", None, b"u")], ("user",)) == canonical_multipart(
        one, ()
    )


def test_keys_partition_tenants_and_hide_credentials():
    """Another credential, org or project gives another key; no key contains the credential."""
    secret, mac = b"s", b"k" * 32
    tenants = {
        tenant_digest(mac, "Bearer sk-a", "", ""),
        tenant_digest(mac, "Bearer sk-b", "", ""),
        tenant_digest(mac, "Bearer sk-a", "org", ""),
        tenant_digest(mac, "Bearer sk-a", "", "proj"),
        tenant_digest(mac, "Bearer sk-", "a", ""),  # the parts cannot run into each other
    }
    assert len(tenants) == 5
    keys = {cache_key(secret, t, "POST", "/v1/x", "", "", b"{}") for t in tenants}
    assert len(keys) == 5 and all("sk-" not in k for k in keys)
    t = next(iter(tenants))
    assert cache_key(secret, t, "POST", "/v1/x", "", "ns", b"{}") != cache_key(
        secret, t, "POST", "/v1/x", "", "", b"{}"
    )
    assert cache_key(b"other", t, "POST", "/v1/x", "", "", b"{}") not in keys


def test_raw_digest_covers_every_part():
    """The memo digest changes with any part of the request line or body."""
    base = raw_digest(b"k" * 32, "a\0b", b"body")
    assert raw_digest(b"k" * 32, "a\0c", b"body") != base
    assert raw_digest(b"k" * 32, "a\0b", b"bodz") != base
    assert raw_digest(b"j" * 32, "a\0b", b"body") != base

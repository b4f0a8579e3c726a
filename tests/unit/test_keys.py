"""keys.py on its own: tenants, keys and raw digests."""

from __future__ import annotations

from proxy.keys import cache_key, raw_digest, tenant_digest


def test_keys_partition_tenants_and_hide_credentials() -> None:
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


def test_raw_digest_covers_every_part() -> None:
    """The memo digest changes with any part of the request line or body."""
    base = raw_digest(b"k" * 32, "a\0b", b"body")
    assert raw_digest(b"k" * 32, "a\0c", b"body") != base
    assert raw_digest(b"k" * 32, "a\0b", b"bodz") != base
    assert raw_digest(b"j" * 32, "a\0b", b"body") != base


def test_the_credential_is_every_credential_header_in_order() -> None:
    """credential_of (spelled out for speed) frames every value of each header named in
    CREDENTIAL_HEADERS, in that order: any change to one of them changes it."""
    from multidict import CIMultiDict

    from proxy.keys import CREDENTIAL_HEADERS, credential_of, header_values

    h: CIMultiDict[str] = CIMultiDict(
        [("API-KEY", "k1"), ("authorization", "Bearer a"), ("api-key", "k2"), ("X-Api-Key", "x")]
    )
    assert credential_of(h) == "|".join(header_values(h, n) for n in CREDENTIAL_HEADERS)
    assert credential_of(h) == "8:Bearer a|2:k12:k2|1:x"
    assert credential_of(CIMultiDict()) == "||"

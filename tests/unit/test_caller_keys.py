"""caller_keys.read_caller: the caller's cache headers and their documented aliases."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.caller_keys import NO_CALLER, BadCacheHeader, CallerControls, read_caller
from proxy.controls import DEFAULT_CONTROLS, Mode, with_caller


def read(**headers: str) -> CallerControls:
    return read_caller(CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}))


def test_no_header_is_no_caller() -> None:
    """A request without any of the headers gets the shared NO_CALLER (nothing to memo)."""
    assert read(Authorization="Bearer x") is NO_CALLER
    assert NO_CALLER.memo == "" and not NO_CALLER.keys


def test_key_and_fields_and_aliases() -> None:
    """X-Cache-Key and cf-aig-cache-key name the entry; ignored fields are deduplicated and
    sorted, whichever header (X-Cache-Ignore-Fields, Helicone-Cache-Ignore-Keys) names them."""
    assert read(X_Cache_Key=" k1 ").key == "k1"
    assert read(cf_aig_cache_key="k2").key == "k2"
    assert read(X_Cache_Key="   ").key is None
    assert read(X_Cache_Ignore_Fields="user, temperature,user").ignore == ("temperature", "user")
    assert read(Helicone_Cache_Ignore_Keys="a.b,c").ignore == ("a.b", "c")
    assert read(X_Cache_Key="a|b").memo != read(X_Cache_Key="a", X_Cache_Ignore_Fields="b").memo


def test_ttl_and_skip() -> None:
    """X-Cache-TTL is seconds as given; cf-aig-cache-ttl is held to Cloudflare's 60 s to a
    month; skip-cache true and Helicone-Cache-Enabled false bypass."""
    assert read(X_Cache_TTL="5").ttl_s == 5.0
    assert read(cf_aig_cache_ttl="5").ttl_s == 60.0
    assert read(cf_cache_ttl="99999999").ttl_s == 30 * 86400.0
    assert read(cf_aig_skip_cache="true").skip and read(cf_skip_cache="TRUE").skip
    assert not read(cf_aig_skip_cache="false").skip
    assert read(Helicone_Cache_Enabled="false").skip
    assert not read(Helicone_Cache_Enabled="true").skip


def test_controls_follow_the_caller() -> None:
    """skip is no-store; a TTL is a max-age, the shorter of it and Cache-Control's."""
    assert with_caller(DEFAULT_CONTROLS, read(cf_aig_skip_cache="true")).mode is Mode.BYPASS
    assert with_caller(DEFAULT_CONTROLS, read(X_Cache_TTL="30")).max_age == 30.0
    assert with_caller(DEFAULT_CONTROLS, read(X_Cache_Key="k")) is DEFAULT_CONTROLS


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Cache-TTL": "-1"},
        {"X-Cache-TTL": "1.5"},
        {"cf-aig-cache-ttl": "soon"},
        {"X-Cache-Key": "k" * 1025},
        {"X-Cache-Ignore-Fields": ",".join(f"f{i}" for i in range(65))},
        {"X-Cache-Ignore-Fields": "x" * 257},
    ],
)
def test_bad_values_are_refused(headers: dict[str, str]) -> None:
    """Unreadable or unbounded values raise BadCacheHeader (an OpenAI-shaped 400)."""
    with pytest.raises(BadCacheHeader):
        read_caller(CIMultiDict(headers))
